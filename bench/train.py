"""Benchmark: training to the reference's validation RMSE, the BridgeAI loop vs our trainer.

Why: retraining runs on every new batch, so the trainer must stay cheap as the lake grows. The
goal is that, at a few hundred thousand rows, our trainer reaches the reference's best
validation RMSE (within 1%) at least 5x faster than the reference loop takes to reach it. The reference is the BridgeAI training
loop: the 20→64→32→16→8→1 ReLU MLP on standardised raw price, MSE, Adam lr 0.01, batches of 64
drawn row by row through a shuffled `DataLoader` over a `TensorDataset`, early stopping with
patience 10 (here with best-weights tracking, which the original lacked).

    python bench/train.py            # 300,000 rows, simulator seed 5

One process, one data set: N simulated rows (`Simulator`), validated by the contract and
prepared as the feature pipeline does (`prepare_batch`: exact duplicates dropped, hash split on
`row_id` via `assign_split`). Both sides train on the train split, stop on the validation split
and are scored on validation and test, RMSE on the price scale.

- Reference: implemented here (it is what we compare against). Same `Preprocessor`, target
  scaling and `PriceNet` as ours, so from the same seed it starts from the same weights. Its
  validation loss is computed on the whole validation tensor at once, as ours is, so only the
  training loop differs. It stops after `--reference-max-epochs` (default 50) if early stopping
  has not fired by then; the script says when that happened (the target is then the best RMSE
  it reached within the cap).
- Ours, twice: `train_model` itself, unchanged, (a) with the reference's own batch size and
  learning rate — what the training loop alone is worth — and (b) with the fixed configuration
  `OURS` below, chosen on other data (seed 0, 20k and 200k rows) than this benchmark's default
  (seed 5, 300k rows). `train_model` has no callbacks, so its whole wall time (including the
  `patience` epochs it trains past its best one) is taken as its time to the target: an upper
  bound. The headline compares that with the reference's time to its own best epoch (not its
  whole run, which includes the patience epochs after it).

Both timings include preprocessing (fitting the `Preprocessor`, encoding the train and
validation rows, scaling the target) and exclude simulation, validation and scoring. Torch's
default thread count is used for both, and both sides first run one untimed epoch on a few
rows so that first-call costs fall on neither.

Ours must reach the reference's best validation RMSE x 1.01 within ten times the reference's
wall time, or the script says so and exits 1. The last line printed is the speed ratio
(reference's time to its best epoch / ours to the same validation RMSE).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bridge_assets.core.contract import TARGET, validate
from bridge_assets.core.features import Preprocessor, prepare_batch
from bridge_assets.core.metrics import regression_metrics
from bridge_assets.core.presets import TrainConfig, preset
from bridge_assets.core.simulator import Simulator
from bridge_assets.core.training import PriceNet, TrainedModel, train_model

REFERENCE: TrainConfig = preset("reference")
# Ours: the reference's own network, target and loss (so "the same validation RMSE" means the
# same model family), trained by `train_model` on in-memory tensors with index-slice batches of
# 2048 rows, learning rate 0.02, patience 10 as the reference, at most 300 epochs. Large batches
# are what in-memory batching makes cheap. Chosen once from a trial at 20k and 200k rows (seed 0)
# of batch 512-4096 with rate 0.01-0.05 and of the `default` preset: every setting reached the
# target at 200k, batch 1024-4096 at 17-29x; 4096/0.05 missed it at 20k. 2048/0.02 is a middle
# setting, not the fastest. Fixed here, not tuned per run.
OURS: TrainConfig = replace(
    preset("reference", batch_size=2048, learning_rate=0.02, max_epochs=300), name="reference-batch-2048"
)
TARGET_SLACK = 1.01
TIME_LIMIT_FACTOR = 10.0


@dataclass
class Result:
    """One side's trained model, how long it took and how it scores."""

    label: str
    model: TrainedModel
    seconds: float
    epochs: int
    best_epoch: int
    seconds_to_best: float | None
    metrics: dict[str, float]


def simulate(rows: int, seed: int) -> dict[str, pl.DataFrame]:
    """N simulated rows, validated and prepared as the pipeline does, by hash split."""
    raw = pl.concat(list(Simulator.fit().generate(rows, seed=seed, batch_id="bench")))
    checked = validate(raw)
    if checked.quarantined.height:
        bad = checked.quarantined.height
        raise RuntimeError(f"{bad} simulated rows failed the contract: {checked.reason_counts()}")
    prepared = prepare_batch(checked.valid, "bench").rows
    return {name: prepared.filter(pl.col("split") == name) for name in ("train", "validation", "test")}


def train_reference(
    train_rows: pl.DataFrame, validation_rows: pl.DataFrame, config: TrainConfig, max_epochs: int
) -> tuple[TrainedModel, list[float]]:
    """The BridgeAI loop: a shuffled per-row `DataLoader`, early stopping, best weights kept.

    Returns the model and the seconds elapsed at the end of each epoch.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    preprocessor = Preprocessor.fit(train_rows)
    x_train = np.ascontiguousarray(preprocessor.transform(train_rows), dtype=np.float32)
    x_val = np.ascontiguousarray(preprocessor.transform(validation_rows), dtype=np.float32)
    y_train = train_rows[TARGET].to_numpy().astype(np.float64)
    y_val = validation_rows[TARGET].to_numpy().astype(np.float64)
    mean, std = float(y_train.mean()), float(y_train.std()) or 1.0
    features = torch.from_numpy(x_train)
    target = torch.from_numpy(((y_train - mean) / std).astype(np.float32))
    val_features = torch.from_numpy(x_val)
    val_target = torch.from_numpy(((y_val - mean) / std).astype(np.float32))

    net = PriceNet(x_train.shape[1], config.hidden, linear_skip=False)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    loss_fn = nn.MSELoss()
    loader = DataLoader(
        TensorDataset(features, target),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )

    def validation_loss() -> float:
        net.eval()
        with torch.no_grad():
            loss = float(loss_fn(net(val_features), val_target))
        net.train()
        return loss

    best_loss, best_epoch = validation_loss(), 0
    best_state = copy.deepcopy(net.state_dict())
    history: list[dict[str, float | None]] = [{"epoch": 0, "train_loss": None, "val_loss": best_loss}]
    epoch_seconds: list[float] = [time.perf_counter() - started]
    for epoch in range(1, max_epochs + 1):
        total, seen = 0.0, 0
        for batch_features, batch_target in loader:
            optimiser.zero_grad()
            loss = loss_fn(net(batch_features), batch_target)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch_target)
            seen += len(batch_target)
        val_loss = validation_loss()
        history.append({"epoch": epoch, "train_loss": total / seen, "val_loss": val_loss})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(net.state_dict())
        epoch_seconds.append(time.perf_counter() - started)
        if epoch - best_epoch >= config.patience:
            break
    model = TrainedModel(replace_epochs(config, max_epochs), preprocessor, mean, std, best_state, history, best_epoch)
    return model, epoch_seconds


def replace_epochs(config: TrainConfig, max_epochs: int) -> TrainConfig:
    """The configuration as actually run (the epoch cap may differ from the preset's)."""
    return replace(config, max_epochs=max_epochs)


def score(model: TrainedModel, splits: dict[str, pl.DataFrame]) -> dict[str, float]:
    """Validation and test MAE/RMSE/R² on the price scale."""
    metrics: dict[str, float] = {}
    for name, prefix in (("validation", "val"), ("test", "test")):
        rows = splits[name]
        for metric, value in regression_metrics(rows[TARGET].to_numpy(), model.predict(rows)).items():
            metrics[f"{prefix}_{metric}"] = value
    return metrics


def run_reference(splits: dict[str, pl.DataFrame], max_epochs: int) -> Result:
    started = time.perf_counter()
    model, epoch_seconds = train_reference(splits["train"], splits["validation"], REFERENCE, max_epochs)
    seconds = time.perf_counter() - started
    epochs = len(model.history) - 1
    to_best = epoch_seconds[model.best_epoch]
    return Result("reference", model, seconds, epochs, model.best_epoch, to_best, score(model, splits))


def run_ours(splits: dict[str, pl.DataFrame], config: TrainConfig = OURS) -> Result:
    started = time.perf_counter()
    model = train_model(splits["train"], splits["validation"], config)
    seconds = time.perf_counter() - started
    epochs = len(model.history) - 1
    return Result("ours", model, seconds, epochs, model.best_epoch, None, score(model, splits))


def warm_up(splits: dict[str, pl.DataFrame]) -> None:
    """One untimed epoch of each side on a few rows: first-call costs (torch kernels, Polars
    query set-up) would otherwise all land on whichever side runs first."""
    few = {name: rows.head(512) for name, rows in splits.items()}
    train_reference(few["train"], few["validation"], REFERENCE, max_epochs=1)
    train_model(few["train"], few["validation"], replace(OURS, max_epochs=1))


def describe(config: TrainConfig) -> str:
    arch = "→".join(str(n) for n in (20, *config.hidden, 1))
    target = "log price" if config.log_target else "raw price"
    return (
        f"{config.name}: {arch} ReLU{' + linear skip' if config.linear_skip else ''} on standardised {target}, "
        f"MSE, Adam lr {config.learning_rate:g}{f' wd {config.weight_decay:g}' if config.weight_decay else ''}, "
        f"batch {config.batch_size}, patience {config.patience}, max {config.max_epochs} epochs, seed {config.seed}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows to simulate (default 300,000)")
    parser.add_argument("--seed", type=int, default=5, help="simulator seed (default 5; OURS was chosen on seed 0)")
    parser.add_argument(
        "--reference-max-epochs",
        type=int,
        default=50,
        help="cap on the reference's epochs if early stopping has not fired (default 50)",
    )
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.reference_max_epochs <= 0:
        parser.error("--rows and --reference-max-epochs must be positive")

    started = time.perf_counter()
    splits = simulate(args.rows, args.seed)
    sizes = ", ".join(f"{name} {rows.height:,}" for name, rows in splits.items())
    print(f"rows: {args.rows:,} simulated (seed {args.seed}) in {time.perf_counter() - started:.1f} s; {sizes}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"reference config: {describe(replace_epochs(REFERENCE, args.reference_max_epochs))}, per-row DataLoader")
    print(f"ours config:      {describe(OURS)}, train_model (in-memory tensors, index-slice batches)")

    warm_up(splits)
    reference = run_reference(splits, args.reference_max_epochs)
    stopped_early = reference.epochs - reference.best_epoch >= REFERENCE.patience
    capped = reference.epochs == args.reference_max_epochs and not stopped_early
    target = reference.metrics["val_rmse"] * TARGET_SLACK
    limit = reference.seconds * TIME_LIMIT_FACTOR
    print(
        f"reference: best val RMSE {reference.metrics['val_rmse']:,.0f} (R² {reference.metrics['val_r2']:.4f}) "
        f"at epoch {reference.best_epoch} of {reference.epochs}"
        f"{' (epoch cap hit, early stopping had not fired)' if capped else ' (early stopping fired)'}; "
        f"test RMSE {reference.metrics['test_rmse']:,.0f}; {reference.seconds:.1f} s in all "
        f"({reference.seconds / max(reference.epochs, 1):.2f} s/epoch), "
        f"{reference.seconds_to_best:.1f} s to its best epoch"
    )
    print(
        f"target: validation RMSE <= {target:,.0f} (reference best x {TARGET_SLACK}) "
        f"within {limit:.1f} s (10x the reference's time)"
    )

    loop_alone = run_ours(splits, replace(REFERENCE, name="reference-settings", max_epochs=args.reference_max_epochs))
    loop_first = _first_epoch_at(loop_alone.model, target)
    print(
        f"ours with the reference's batch {REFERENCE.batch_size} and lr {REFERENCE.learning_rate:g} (the loop alone): "
        f"best val RMSE {loop_alone.metrics['val_rmse']:,.0f} at epoch {loop_alone.best_epoch} of {loop_alone.epochs}"
        f"{f', first under the target at epoch {loop_first}' if loop_first is not None else ', never under the target'}; "
        f"{loop_alone.seconds:.2f} s in all ({loop_alone.seconds / max(loop_alone.epochs, 1):.3f} s/epoch, "
        f"reference {reference.seconds / max(reference.epochs, 1):.2f} s/epoch: "
        f"{(reference.seconds / max(reference.epochs, 1)) / (loop_alone.seconds / max(loop_alone.epochs, 1)):.1f}x per epoch)"
    )

    ours = run_ours(splits)
    first = _first_epoch_at(ours.model, target)
    print(
        f"ours:      best val RMSE {ours.metrics['val_rmse']:,.0f} (R² {ours.metrics['val_r2']:.4f}) "
        f"at epoch {ours.best_epoch} of {ours.epochs}"
        f"{f', first under the target at epoch {first}' if first is not None else ''}; "
        f"test RMSE {ours.metrics['test_rmse']:,.0f}; {ours.seconds:.2f} s in all "
        f"({ours.seconds / max(ours.epochs, 1):.3f} s/epoch)"
    )
    reached = ours.metrics["val_rmse"] <= target
    in_time = ours.seconds <= limit
    if not (reached and in_time):
        why = (
            f"best val RMSE {ours.metrics['val_rmse']:,.0f} > target {target:,.0f}"
            if not reached
            else f"{ours.seconds:.1f} s > limit {limit:.1f} s"
        )
        print(f"TARGET NOT MET: ours did not reach the reference's validation RMSE within 10x its time ({why})")
        print(
            "speed ratio (reference's time to its best epoch / ours to the same validation RMSE): "
            f"not reached (ours {ours.seconds:.1f} s, reference {reference.seconds:.1f} s)"
        )
        return 1
    print(
        f"target met: ours {ours.metrics['val_rmse']:,.0f} <= {target:,.0f} in {ours.seconds:.2f} s "
        f"(whole train_model run, an upper bound on its time to the target); against the reference's "
        f"whole run including its patience epochs: {reference.seconds / ours.seconds:.1f}x"
    )
    print(
        f"speed ratio (reference's time to its best epoch / ours to the same validation RMSE): "
        f"{reference.seconds_to_best / ours.seconds:.1f}x ({reference.seconds_to_best:.1f} s / {ours.seconds:.2f} s)"
    )
    return 0


def _first_epoch_at(model: TrainedModel, target_rmse: float) -> int | None:
    """First epoch whose validation RMSE (from the scaled-MSE history) is within the target.

    Only for a raw-price target, where RMSE = sqrt(val MSE) x target std; informational.
    """
    if model.config.log_target:
        return None
    for entry in model.history:
        loss = entry["val_loss"]
        if loss is not None and np.sqrt(loss) * model.target_std <= target_rmse:
            return int(entry["epoch"])
    return None


if __name__ == "__main__":
    sys.exit(main())
