"""The price network's configurations, its named presets and a training round's options: plain
data, so that whatever only names them (the asset graph, the CLI) does not import torch.

Two presets:
- `reference`: the BridgeAI MLP, 20→64→32→16→8→1 ReLU on raw price, MSE, Adam 0.01, batch
  64, early stopping patience 10.
- `default`: residual learning over a linear model on log price: a linear layer warm-started
  with the least-squares solution of the training split plus a small ReLU network whose output
  starts at zero. Epoch 0 is therefore the log-linear baseline, and training keeps a change
  only if it lowers validation error by at least `min_improvement` (1%), so a few hundred
  validation rows' noise does not pull it away from a solid linear fit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Option = Literal["recalibrate", "finetune", "scratch"]
OPTIONS: tuple[Option, ...] = ("recalibrate", "finetune", "scratch")  # cheapest first


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
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
}


def preset(name: str, /, **overrides: Any) -> TrainConfig:
    """A named preset, with any fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
