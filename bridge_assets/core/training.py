"""The PyTorch price model and its trainer, bridge's default (no Dagster, no MLflow).

Training runs on in-memory tensors, slicing shuffled index batches (no per-row DataLoader),
is deterministic from a seed, and always returns the best-validation weights (the reference
lost its model when early stopping never fired).

Its configurations and presets: `bridge_assets.core.presets`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from bridge_assets.core.contract import TARGET
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.metrics import LinearModel
from bridge_assets.core.model_api import (
    DESCRIPTION,
    NETWORK_LOADER,
    CannotContinue,
    read_description,
    write_description,
)
from bridge_assets.core.presets import TrainConfig


class PriceNet(nn.Module):
    """An MLP on the encoded features, optionally plus a linear skip path."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...], linear_skip: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.output = nn.Linear(width, 1)
        self.skip = nn.Linear(n_inputs, 1) if linear_skip else None
        if self.skip is not None:  # the residual network starts as "no change"
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.output(self.body(features)).squeeze(-1)
        if self.skip is not None:
            out = out + self.skip(features).squeeze(-1)
        return out


@dataclass
class TrainedModel:
    """A fitted model: preprocessing state, target scaling, network weights and history."""

    config: TrainConfig
    preprocessor: Preprocessor
    target_mean: float
    target_std: float
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float | None]] = field(default_factory=list)  # epoch 0: before training
    best_epoch: int = 0
    _net: PriceNet | None = field(default=None, init=False, repr=False, compare=False)

    def network(self) -> PriceNet:
        """The network with these weights, built once: serving predicts with it per request."""
        if self._net is None:
            net = PriceNet(len(self.preprocessor.feature_names), self.config.hidden, self.config.linear_skip)
            net.load_state_dict(self.state_dict)
            self._net = net.eval()
        return self._net

    def predict_encoded(self, features: np.ndarray) -> np.ndarray:
        """Prices from an already-encoded matrix."""
        net = self.network()
        with torch.no_grad():
            scaled = net(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).double().numpy()
        raw = scaled * self.target_std + self.target_mean
        return np.exp(raw) if self.config.log_target else raw

    def predict(self, rows: pl.DataFrame | pl.LazyFrame) -> np.ndarray:
        """Prices for raw housing rows (the same encoding as in training)."""
        return self.predict_encoded(self.preprocessor.transform(rows))

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `weights.pth` and `model.json` (config, preprocessing, target scaling, history)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.pth"
        torch.save(self.state_dict, weights)
        description = write_description(
            directory, NETWORK_LOADER, self, target_mean=self.target_mean, target_std=self.target_std
        )
        return {"weights": weights, "model": description}

    @classmethod
    def load_dir(cls, directory: str | Path) -> TrainedModel:
        return cls.load(Path(directory) / "weights.pth", Path(directory) / DESCRIPTION)

    @classmethod
    def load(cls, weights: str | Path, description: str | Path) -> TrainedModel:
        """A saved model with its network built, ready for a first request."""
        meta = read_description(Path(description).parent)
        model = cls(
            config=meta["config"],
            preprocessor=meta["preprocessor"],
            target_mean=meta["target_mean"],
            target_std=meta["target_std"],
            state_dict=torch.load(weights, weights_only=True),
            history=meta["history"],
            best_epoch=meta["best_epoch"],
        )
        model.network()
        return model


def _tensor(matrix: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))


def _checked_weights(weights: np.ndarray | None, rows: int) -> np.ndarray | None:
    """Per-row training weights as float64, or None for equal weights; refuses what cannot weight."""
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (rows,):
        raise ValueError(f"need one sample weight per training row ({rows}), got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("sample weights must be finite, non-negative and not all zero")
    return weights


def train_model(
    train_rows: pl.DataFrame,
    validation_rows: pl.DataFrame,
    config: TrainConfig,
    preprocessor: Preprocessor | None = None,
    *,
    sample_weights: np.ndarray | None = None,
    warm_start: TrainedModel | None = None,
) -> TrainedModel:
    """Fit preprocessing on the training rows (or take one already fitted on them), then train
    with early stopping on validation.

    `sample_weights` (one per training row, e.g. recency) make every epoch draw its rows with
    probability proportional to their weight, and the linear warm start a weighted ridge fit:
    the weighted squared error is what is minimised, at the cost of an unweighted epoch.
    `warm_start` fine-tunes an existing model instead of training a new one: its network,
    preprocessing and target scaling are kept (so epoch 0 is that model), and `config` must
    describe the same network."""
    torch.manual_seed(config.seed)
    if warm_start is not None:
        if not isinstance(warm_start, TrainedModel):
            raise CannotContinue(f"the network can only fine-tune a network, not a {type(warm_start).__name__}")
        if (config.hidden, config.linear_skip, config.log_target) != (
            warm_start.config.hidden,
            warm_start.config.linear_skip,
            warm_start.config.log_target,
        ):
            raise ValueError(
                f"config {config.name!r} describes another network than the model it fine-tunes ({warm_start.config.name!r})"
            )
        preprocessor = warm_start.preprocessor
    preprocessor = preprocessor or Preprocessor.fit(train_rows)
    x_train = preprocessor.transform(train_rows)
    x_val = preprocessor.transform(validation_rows)
    y_train = train_rows[TARGET].to_numpy().astype(np.float64)
    y_val = validation_rows[TARGET].to_numpy().astype(np.float64)
    if config.log_target:
        y_train, y_val = np.log(y_train), np.log(y_val)
    weights = _checked_weights(sample_weights, len(y_train))
    if warm_start is not None:
        mean, std = warm_start.target_mean, warm_start.target_std
    else:
        mean = float(np.average(y_train, weights=weights))
        std = float(np.sqrt(np.average((y_train - mean) ** 2, weights=weights))) or 1.0

    net = PriceNet(x_train.shape[1], config.hidden, config.linear_skip)
    if warm_start is not None:
        net.load_state_dict(warm_start.state_dict)
    elif net.skip is not None:  # warm start: the (weighted) ridge solution on the scaled target
        ridge = LinearModel.fit(x_train, (y_train - mean) / std, ridge=config.ridge, weights=weights)
        with torch.no_grad():
            net.skip.weight.copy_(torch.from_numpy(ridge.coefficients).float().unsqueeze(0))
            net.skip.bias.fill_(ridge.intercept)
    features, target = _tensor(x_train), _tensor((y_train - mean) / std)
    val_features, val_target = _tensor(x_val), _tensor((y_val - mean) / std)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.MSELoss()
    generator = torch.Generator().manual_seed(config.seed)
    draw = torch.from_numpy(weights) if weights is not None else None

    def validation_loss() -> float:
        net.eval()
        with torch.no_grad():
            loss = float(loss_fn(net(val_features), val_target))
        net.train()
        return loss

    best_loss, best_epoch = validation_loss(), 0
    best_state = copy.deepcopy(net.state_dict())
    history: list[dict[str, float | None]] = [{"epoch": 0, "train_loss": None, "val_loss": best_loss}]
    for epoch in range(1, config.max_epochs + 1):
        if draw is None:
            order = torch.randperm(len(features), generator=generator)
        else:
            order = torch.multinomial(draw, len(features), replacement=True, generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(net(features[batch]), target[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        val_loss = validation_loss()
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss})
        if val_loss < best_loss * (1 - config.min_improvement):
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    return TrainedModel(config, preprocessor, mean, std, best_state, history, best_epoch)
