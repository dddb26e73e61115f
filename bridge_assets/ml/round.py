"""A training round: several options on one feature version, scored against baselines.

A round always trains its configurations from scratch. With an incumbent (the Production
version) it can also fine-tune the incumbent's model on the rows it never saw, and recalibrate
the incumbent's predictions without training at all. After drift, what counts is the world as
it is now: validation and the choice between options use the held-out rows of batches the
incumbent never saw (`recent_batches`; the hash split keeps every row in one part, so no row
both trains and judges), and the from-scratch models and the linear baselines weight rows by
`Recency` alike. Without recent rows the round is the plain one: the whole validation split.

The choice prefers the cheapest option that is as good as the best: a costlier option
(recalibration < fine-tuning < training from scratch) wins only if it lowers the validation
RMSE by more than `min_gain` and beyond chance on those rows (a paired test of the squared
errors, one-sided 95%), so a few hundred validation rows' noise does not buy a new model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from bridge_assets.core.calibration import CalibrationKind, Recalibration
from bridge_assets.core.contract import SEEN_AT, TARGET
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.metrics import BASELINES, LinearModel, regression_metrics
from bridge_assets.core.model_api import CannotContinue, Model, trainer_of
from bridge_assets.core.presets import OPTIONS, Option, TrainConfig
from bridge_assets.core.recency import Recency

SPLIT_COLUMNS = {"hash": "split", "reference": "reference_split"}
SELECTION_METRIC = "val_rmse"
QUALIFYING_METRICS = ("val_rmse", "val_mae")
MIN_RECENT_ROWS = 30  # recent training and validation rows needed to judge or fit on them
SIGNIFICANCE_Z = 1.645  # one-sided 95%: how far beyond chance a costlier option must win


@dataclass(frozen=True)
class Incumbent:
    """The version a round may fine-tune or recalibrate (Production), as it predicts today."""

    version: str
    model: Model
    calibration: Recalibration | None = None


@dataclass(frozen=True)
class RoundPolicy:
    """How a round treats drift (all off by default: the plain round)."""

    options: tuple[Option, ...] = ("scratch",)
    recency: Recency = field(default_factory=Recency)
    recent_batches: frozenset[str] = frozenset()
    min_gain: float = 0.01
    calibration: CalibrationKind = "log_offset"

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(OPTIONS)
        if unknown or not self.options:
            raise ValueError(f"round options must be some of {OPTIONS}, got {list(self.options)}")

    def to_dict(self) -> dict:
        return {
            "options": list(self.options),
            "recency": self.recency.to_dict(),
            "recent_batches": sorted(self.recent_batches),
            "min_gain": self.min_gain,
            "calibration": self.calibration,
        }


@dataclass
class Candidate:
    """One option's model, its recalibration stage if any, and its metrics (`val_*`, `test_*`,
    `recent_test_*` when there are recent rows)."""

    config: TrainConfig
    model: Model
    metrics: dict[str, float]
    option: Option = "scratch"
    calibration: Recalibration | None = None
    trained_rows: int = 0
    note: str = ""
    val_errors: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # per validation row

    def predict_encoded(self, features: np.ndarray) -> np.ndarray:
        predictions = self.model.predict_encoded(features)
        return self.calibration.apply(predictions) if self.calibration else predictions

    def option_hash(self, policy: RoundPolicy, incumbent: str | None) -> str:
        """What besides data and configuration made this model: recorded, so two rounds that
        differ only in policy are not mistaken for the same version."""
        described = {
            "option": self.option,
            "recency": policy.recency.to_dict() if self.option == "scratch" else None,
            "incumbent": incumbent if self.option != "scratch" else None,
            "calibration": self.calibration.kind if self.calibration else None,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RoundResult:
    """Every candidate, the baselines' metrics, and the best candidate (see `best`)."""

    candidates: list[Candidate]
    baselines: dict[str, dict[str, float]]
    split: str
    rows: dict[str, int] = field(default_factory=dict)
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    incumbent: str | None = None
    validation: str = "all"  # "recent": validated on the rows of batches the incumbent never saw
    skipped: dict[str, str] = field(default_factory=dict)  # option → why it did not run

    def qualifies(self, candidate: Candidate) -> bool:
        """At least as good as every linear baseline on validation, in RMSE and in MAE — what the
        `baseline` gate asks later on test rows."""
        return all(candidate.metrics[m] <= b[m] for b in self.baselines.values() for m in QUALIFYING_METRICS)

    @property
    def best(self) -> Candidate:
        """Among the candidates that qualify (with none qualifying, among all; the gate then says
        why), the lowest validation RMSE of the cheapest option, replaced by a costlier option's
        best only where that is `clearly_better`."""
        pool = [c for c in self.candidates if self.qualifies(c)] or self.candidates
        per_option: dict[str, Candidate] = {}
        for candidate in sorted(pool, key=lambda c: (OPTIONS.index(c.option), c.metrics[SELECTION_METRIC])):
            per_option.setdefault(candidate.option, candidate)
        chosen: Candidate | None = None
        for candidate in per_option.values():
            if chosen is None or clearly_better(candidate.val_errors, chosen.val_errors, self.policy.min_gain):
                chosen = candidate
        assert chosen is not None  # a round has at least one candidate
        return chosen

    def reason(self) -> str:
        """Why the best candidate was chosen, in one sentence."""
        best = self.best
        rows = f"{self.rows.get('validation', 0)} {'recent ' if self.validation == 'recent' else ''}validation rows"
        lowest = min(self.candidates, key=lambda c: c.metrics[SELECTION_METRIC])
        text = f"{best.config.name} ({best.option}): validation RMSE {best.metrics[SELECTION_METRIC]:,.0f} on {rows}"
        if lowest is not best:
            text += f"; {lowest.config.name} ({lowest.option}) scored {lowest.metrics[SELECTION_METRIC]:,.0f} but " + (
                "did not beat every baseline"
                if not self.qualifies(lowest)
                else f"a costlier option must be better by more than {self.policy.min_gain:.0%} and beyond chance on these rows"
            )
        if not self.qualifies(best):
            text += "; no candidate beat every baseline on validation"
        return text

    def choice_table(self) -> str:
        """Markdown: every option the round ran (or skipped), on the same rows, and the choice."""
        recent = any("recent_test_rmse" in c.metrics for c in self.candidates)
        head = (
            "| option | model | rows trained | recalibration | val RMSE | val MAE | test RMSE |"
            + (" recent test RMSE |" if recent else "")
            + " beats baselines | |"
        )
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        best = self.best
        for c in sorted(self.candidates, key=lambda c: OPTIONS.index(c.option)):
            m = c.metrics
            lines.append(
                f"| {c.option} | {c.config.name}{' — ' + c.note if c.note else ''} | {c.trained_rows:,} | "
                f"{c.calibration.describe() if c.calibration else 'none'} | {m['val_rmse']:,.0f} | {m['val_mae']:,.0f} | {m['test_rmse']:,.0f} |"
                + (f" {m['recent_test_rmse']:,.0f} |" if recent else "")
                + f" {'yes' if self.qualifies(c) else 'no'} | {'**chosen**' if c is best else ''} |"
            )
        for name, scores in self.baselines.items():
            lines.append(
                f"| baseline | {name} |  |  | {scores['val_rmse']:,.0f} | {scores['val_mae']:,.0f} | {scores['test_rmse']:,.0f} |"
                + (f" {scores['recent_test_rmse']:,.0f} |" if recent else "")
                + "  |  |"
            )
        for option, why in self.skipped.items():
            lines.append(f"| {option} | not run: {why} |" + " |" * (head.count("|") - 3))
        return "\n".join(lines)


def clearly_better(challenger: np.ndarray, incumbent: np.ndarray, min_gain: float) -> bool:
    """Whether the `challenger`'s errors beat the `incumbent`'s on the same rows: RMSE lower by
    more than `min_gain`, and the mean drop in squared error more than `SIGNIFICANCE_Z` standard
    errors above zero (paired rows: a few lucky rows do not count)."""
    if len(challenger) < 2 or len(challenger) != len(incumbent):
        return False
    ours, theirs = np.square(challenger), np.square(incumbent)
    if ours.mean() >= theirs.mean() * (1 - min_gain) ** 2:
        return False
    drop = theirs - ours
    return bool(drop.mean() > SIGNIFICANCE_Z * drop.std(ddof=1) / np.sqrt(len(drop)))


def split_rows(features: pl.DataFrame, split: str) -> dict[str, pl.DataFrame]:
    """Train/validation/test rows by the hash split or the reference split (real data only)."""
    if split not in SPLIT_COLUMNS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_COLUMNS)}")
    column = SPLIT_COLUMNS[split]
    parts = {name: features.filter(pl.col(column) == name) for name in ("train", "validation", "test")}
    empty = [name for name, rows in parts.items() if rows.is_empty()]
    if empty:
        raise ValueError(f"the {split} split has no {'/'.join(empty)} rows in this feature version")
    return parts


def recent_mask(rows: pl.DataFrame, recent_batches: Collection[str]) -> np.ndarray:
    """Rows of the given batches (the ones the incumbent never saw)."""
    if not recent_batches or "batch_id" not in rows.columns:
        return np.zeros(rows.height, dtype=bool)
    return rows["batch_id"].is_in(list(recent_batches)).to_numpy()


def recency_weights(rows: pl.DataFrame, recency: Recency) -> np.ndarray | None:
    """`recency`'s weights for these rows, or None when it is off (every row counts the same)."""
    if not recency.active:
        return None
    if SEEN_AT not in rows.columns:
        raise ValueError(
            "recency weighting needs a `seen_at` column: rebuild the feature table (parts carry it since bridge 0.2)"
        )
    return recency.weights(rows[SEEN_AT])


def windowed(train: pl.DataFrame, recency: Recency) -> tuple[pl.DataFrame, np.ndarray | None]:
    """The training rows inside `recency`'s window and their weights (None: all equal, as for a
    window alone, so such a round trains exactly as a plain round on those rows)."""
    weights = recency_weights(train, recency)
    if weights is None:
        return train, None
    inside = weights > 0
    if not inside.any():
        raise ValueError(f"no training rows inside the recency window ({recency.describe()})")
    weights = weights[inside]
    return train.filter(pl.Series(inside)), None if np.all(weights == weights[0]) else weights


def _scores(actual: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{metric}": value for metric, value in regression_metrics(actual, predicted).items()}


def run_round(
    features: pl.DataFrame,
    configs: list[TrainConfig],
    split: str = "hash",
    *,
    policy: RoundPolicy | None = None,
    incumbent: Incumbent | None = None,
) -> RoundResult:
    """Train and compare every option on the same rows; choices are made on validation only.
    Each configuration is trained by its own trainer (`TrainConfig.trainer`); fine-tuning uses
    the incumbent's."""
    policy = policy or RoundPolicy()
    if "scratch" in policy.options and not configs:
        raise ValueError("a training round needs at least one configuration")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique within a round (runs are keyed by them): {names}")
    parts = split_rows(features, split)
    recent = {name: recent_mask(rows, policy.recent_batches) for name, rows in parts.items()}
    use_recent = bool(recent["validation"].sum() >= MIN_RECENT_ROWS and recent["train"].sum() >= MIN_RECENT_ROWS)
    validation = parts["validation"].filter(pl.Series(recent["validation"])) if use_recent else parts["validation"]

    train, weights = windowed(parts["train"], policy.recency)
    recent_train = parts["train"].filter(pl.Series(recent["train"]))
    recent_test = parts["test"].filter(pl.Series(recent["test"]))

    scored = {"val": validation, "test": parts["test"], **({"recent_test": recent_test} if recent_test.height else {})}
    actual = {name: rows[TARGET].to_numpy() for name, rows in scored.items()}
    encode = Preprocessor.fit(train)

    def evaluate(predict: Callable[[pl.DataFrame], np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
        """Metrics on every scored set, and the validation rows' errors (what choices compare)."""
        predicted = {name: predict(rows) for name, rows in scored.items()}
        metrics = {k: v for name in scored for k, v in _scores(actual[name], predicted[name], name).items()}
        return metrics, predicted["val"] - actual["val"]

    baselines = {}
    x_train = encode.transform(train)
    for name, log_target in BASELINES.items():
        linear = LinearModel.fit(x_train, train[TARGET].to_numpy(), log_target=log_target, weights=weights)
        baselines[name] = evaluate(lambda rows: linear.predict(encode.transform(rows)))[0]  # noqa: B023 (evaluate calls it at once)

    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    stage_rows = recent_train if use_recent else None

    def with_stage(candidate: Candidate) -> Candidate:
        """A recalibration stage on a trained model, kept only if it is `clearly_better` on
        validation: a model that already learned the new level needs none."""
        if stage_rows is None:
            return candidate
        stage = Recalibration.fit(
            stage_rows[TARGET].to_numpy(),
            candidate.model.predict(stage_rows),
            policy.calibration,
            _recent_words(policy),
        )
        staged = replace(candidate, calibration=stage)
        staged.metrics, staged.val_errors = evaluate(
            lambda rows: staged.predict_encoded(staged.model.preprocessor.transform(rows))
        )
        return staged if clearly_better(staged.val_errors, candidate.val_errors, policy.min_gain) else candidate

    for option in OPTIONS:
        if option not in policy.options:
            continue
        if option == "scratch":
            for config in configs:  # one preprocessing fit and encoding serve the baselines and every config
                model = trainer_of(config)(train, validation, config, preprocessor=encode, sample_weights=weights)
                note = f"recency {policy.recency.describe()}" if policy.recency.active else ""
                candidate = Candidate(config, model, {}, "scratch", None, train.height, note)
                candidate.metrics, candidate.val_errors = evaluate(
                    lambda rows: model.predict_encoded(model.preprocessor.transform(rows))  # noqa: B023
                )
                candidates.append(with_stage(candidate))
            continue
        if incumbent is None:
            skipped[option] = "no Production version to start from"
            continue
        if not use_recent:
            skipped[option] = f"fewer than {MIN_RECENT_ROWS} training or validation rows the incumbent never saw"
            continue
        if option == "recalibrate":
            stage = Recalibration.fit(
                recent_train[TARGET].to_numpy(),
                incumbent.model.predict(recent_train),
                policy.calibration,
                _recent_words(policy),
            )
            config = replace(incumbent.model.config, name=f"v{incumbent.version}-recalibrated")
            candidate = Candidate(
                config,
                incumbent.model,
                {},
                "recalibrate",
                stage,
                0,
                f"Production v{incumbent.version}'s model, unchanged",
            )
        else:
            config = replace(incumbent.model.config, name=f"v{incumbent.version}-finetuned")
            try:
                model = trainer_of(config)(recent_train, validation, config, warm_start=incumbent.model)
            except CannotContinue as why:
                skipped[option] = str(why)
                continue
            candidate = Candidate(
                config,
                model,
                {},
                "finetune",
                None,
                recent_train.height,
                f"from Production v{incumbent.version}'s weights",
            )
        candidate.metrics, candidate.val_errors = evaluate(
            lambda rows: candidate.predict_encoded(candidate.model.preprocessor.transform(rows))  # noqa: B023
        )
        candidates.append(with_stage(candidate) if option == "finetune" else candidate)
    if not candidates:
        raise ValueError(f"no option of {list(policy.options)} could run: {skipped}")
    rows = {
        "train": train.height,
        "validation": validation.height,
        "test": parts["test"].height,
        **({"recent_train": recent_train.height, "recent_test": recent_test.height} if use_recent else {}),
    }
    # The incumbent is named only when the round judged against what it never saw: a round on
    # the data it was trained on did not set out to replace it.
    return RoundResult(
        candidates,
        baselines,
        split,
        rows,
        policy,
        incumbent.version if incumbent and use_recent else None,
        "recent" if use_recent else "all",
        skipped,
    )


def _recent_words(policy: RoundPolicy) -> str:
    shown = sorted(policy.recent_batches)
    return "training rows of " + ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
