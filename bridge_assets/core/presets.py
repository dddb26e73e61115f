"""Model configurations, their named presets and a training round's options: plain data, so
that whatever only names them (the asset graph, the CLI) imports neither torch nor scikit-learn.

A configuration names the trainer that fits it (`trainer`, an entry point; see
`bridge_assets.core.model_api`): bridge's network by default. Three presets:
- `reference`: the BridgeAI MLP, 20→64→32→16→8→1 ReLU on raw price, MSE, Adam 0.01, batch
  64, early stopping patience 10.
- `default`: residual learning over a linear model on log price: a linear layer warm-started
  with the least-squares solution of the training split plus a small ReLU network whose output
  starts at zero. Epoch 0 is therefore the log-linear baseline, and training keeps a change
  only if it lowers validation error by at least `min_improvement` (1%), so a few hundred
  validation rows' noise does not pull it away from a solid linear fit.
- `boosting`: scikit-learn's histogram gradient boosting on the same features (log price).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Option = Literal["recalibrate", "finetune", "scratch"]
OPTIONS: tuple[Option, ...] = ("recalibrate", "finetune", "scratch")  # cheapest first
DEFAULT_TRAINER = "bridge_assets.core.training:train_model"  # bridge's network
BOOSTING_TRAINER = "bridge_assets.core.boosting:train_boosting"  # scikit-learn's gradient boosting


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model, given its training data."""

    name: str = "default"
    hidden: tuple[int, ...] = (32, 16)
    learning_rate: float = 0.003
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 20
    weight_decay: float = 1e-4
    log_target: bool = True
    linear_skip: bool = True
    ridge: float = 1e-6
    min_improvement: float = 0.01  # relative drop in validation loss that counts as better
    seed: int = 42
    trainer: str = DEFAULT_TRAINER  # the entry point that trains it (`bridge_assets.core.model_api`)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; `trainer` only when it is not the network's, so the network's
        configurations (and their hashes) read as before trainers could be named."""
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        if self.trainer == DEFAULT_TRAINER:
            del data["trainer"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**{**data, "hidden": tuple(data["hidden"])})

    def config_hash(self) -> str:
        """Short hash of the configuration (recorded on every run and model version)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "reference": TrainConfig(
        name="reference",
        hidden=(64, 32, 16, 8),
        learning_rate=0.01,
        batch_size=64,
        max_epochs=500,
        patience=10,
        weight_decay=0.0,
        log_target=False,
        linear_skip=False,
        ridge=0.0,
        min_improvement=0.0,
    ),
    # scikit-learn's histogram gradient boosting on the same encoded features and log target:
    # `max_epochs` caps its trees, `learning_rate`, `patience`, `min_improvement` and `seed` mean
    # what they mean for the network; the network's shape fields are unused.
    "boosting": TrainConfig(name="boosting", trainer=BOOSTING_TRAINER, learning_rate=0.05, max_epochs=400, patience=30),
}


def preset(name: str, /, **overrides: Any) -> TrainConfig:
    """A named preset, with any fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
