"""`bridge` command line: land simulated batches and labels, inspect features, train.

Talks to the store configured by the environment (see the README's configuration table),
without Dagster: the landing sensor notices what it lands.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from bridge_assets.core.simulator import Drift, HousingSimulator
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import land_batch, land_seed, release_labels
from bridge_assets.lake.settings import StorageSettings


def _pairs(values: list[str]) -> dict[str, float]:
    """Parse `name=value` arguments (e.g. `--shift area=0.5`)."""
    parsed: dict[str, float] = {}
    for item in values:
        name, _, value = item.partition("=")
        try:
            parsed[name] = float(value)
        except ValueError:
            raise ValueError(f"expected name=number, got {item!r}") from None
    return parsed


def _simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    store = StorageSettings.from_env().open()
    batch_id = args.batch_id or f"sim-{datetime.now(UTC):%Y%m%dT%H%M%S}-s{args.seed}"
    drift = Drift(
        shift=_pairs(args.shift),
        scale=_pairs(args.scale),
        area_factor=args.area_factor,
        price_factor=args.price_factor,
        concept=_pairs(args.concept),
    )
    blocks = HousingSimulator.fit().generate(
        args.rows,
        seed=args.seed,
        batch_id=batch_id,
        drift=drift,
        corrupt_fraction=args.corrupt_fraction,
        case_noise=args.case_noise,
    )
    with tqdm(total=args.rows, unit="rows", unit_scale=True, disable=args.quiet) as progress:
        batch, rows = land_batch(
            store, batch_id, blocks, fmt=args.format, withhold_labels=args.withhold_labels, on_block=progress.update
        )
    print(f"landed {rows} rows as batch {batch_id}: {store.uri(batch.key)}")
    return 0


def _land_seed(_: argparse.Namespace) -> int:
    store = StorageSettings.from_env().open()
    batch = land_seed(store)
    print(f"landed the real data: {store.uri(batch.key)}" if batch else "the real data has already landed")
    return 0


def _release_labels(args: argparse.Namespace) -> int:
    store = StorageSettings.from_env().open()
    print(f"landed labels: {store.uri(release_labels(store, args.batch_id))}")
    return 0


def _features(args: argparse.Namespace) -> int:
    features = FeatureStore(StorageSettings.from_env().open())
    if args.sql:
        version = args.version or (features.latest() or sys.exit("no feature version yet")).version
        result = features.connect(version).sql(args.sql)
        print(result)
        return 0
    latest = features.latest()
    for version in features.versions():
        pinned = features.load(version)
        mark = "*" if latest and latest.version == version else " "
        print(f"{mark} {version}  {pinned.created_at}  rows={pinned.rows}  splits={pinned.rows_per_split}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from bridge_assets.core.training import preset
    from bridge_assets.ml.round import run_round
    from bridge_assets.ml.tracking import MlflowSettings, log_round

    features = FeatureStore(StorageSettings.from_env().open())
    version = args.feature_version or (features.latest() or sys.exit("no feature version yet")).version
    overrides = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    result = run_round(features.scan(version).collect(), [preset(p, **overrides) for p in args.preset], args.split)
    record = log_round(MlflowSettings.from_env(), result, feature_version=version)
    for candidate in result.candidates:
        print(f"{candidate.config.name:>12}: " + "  ".join(f"{k}={v:,.4g}" for k, v in candidate.metrics.items()))
    for name, scores in result.baselines.items():
        print(f"{name:>12}: " + "  ".join(f"{k}={v:,.4g}" for k, v in scores.items()))
    print(f"registered {record.model_uri} ({record.best_name}) as candidate")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from bridge_assets.ml.tracking import MlflowSettings, promote_to_production

    settings = MlflowSettings.from_env()
    previous = promote_to_production(settings.activate(), settings.model_name, args.version)
    print(f"{settings.model_name} v{args.version} is Production (previous: {previous or 'none'}); "
          "deploy it with `make serve` or by materializing production_deployment")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="land a simulated batch")
    simulate.add_argument("--rows", type=int, default=10_000)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--batch-id")
    simulate.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    simulate.add_argument("--corrupt-fraction", type=float, default=0.0)
    simulate.add_argument("--case-noise", type=float, default=0.0)
    simulate.add_argument("--withhold-labels", action="store_true", help="land prices later (release-labels)")
    simulate.add_argument("--area-factor", type=float, default=1.0)
    simulate.add_argument("--price-factor", type=float, default=1.0, help="label shift")
    simulate.add_argument("--shift", nargs="*", default=[], metavar="FEATURE=SD", help="latent shift")
    simulate.add_argument("--scale", nargs="*", default=[], metavar="FEATURE=FACTOR", help="latent spread")
    simulate.add_argument("--concept", nargs="*", default=[], metavar="FEATURE=FACTOR", help="concept drift")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(run=_simulate)

    commands.add_parser("land-seed", help="land the real housing data").set_defaults(run=_land_seed)

    labels = commands.add_parser("release-labels", help="land a simulated batch's withheld labels")
    labels.add_argument("batch_id")
    labels.set_defaults(run=_release_labels)

    features = commands.add_parser("features", help="list feature versions or query one with SQL")
    features.add_argument("--version", help="version id (default: latest)")
    features.add_argument("--sql", help="DuckDB SQL over the view `features`")
    features.set_defaults(run=_features)
    train = commands.add_parser("train", help="train a round on a feature version and log it to MLflow")
    train.add_argument("--preset", action="append", help="repeatable (default: default and reference)")
    train.add_argument("--split", choices=("hash", "reference"), default="hash")
    train.add_argument("--feature-version", help="default: latest")
    train.add_argument("--max-epochs", type=int)
    train.set_defaults(run=_train)

    promote = commands.add_parser("promote", help="mark a registered model version Production")
    promote.add_argument("version")
    promote.set_defaults(run=_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and not args.preset:
        args.preset = ["default", "reference"]
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError, MlflowException) as error:
        print(f"bridge: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
