"""`bridge` command line: land simulated batches and labels, inspect features, train.

Talks to the store configured by the environment (see the README's configuration table),
without Dagster: the landing sensor notices what it lands.
"""

from __future__ import annotations

import argparse
import sys

from mlflow.exceptions import MlflowException

from bridge_assets.core.simulator import Drift
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import Simulation, land_seed, land_simulated, release_labels
from bridge_assets.lake.settings import StorageSettings, load_environment


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
    drift = Drift(
        shift=_pairs(args.shift),
        scale=_pairs(args.scale),
        area_factor=args.area_factor,
        price_factor=args.price_factor,
        concept=_pairs(args.concept),
    )
    knobs = {"drift": drift, "corrupt_fraction": args.corrupt_fraction, "case_noise": args.case_noise}
    simulation = Simulation(args.rows, withhold_labels=args.withhold_labels, **knobs, **_given(seed=args.seed))
    with tqdm(total=args.rows, unit="rows", unit_scale=True, disable=args.quiet) as progress:
        landed = land_simulated(store, simulation, args.batch_id, fmt=args.format, on_block=progress.update)
    print(f"landed {landed.rows} rows as batch {landed.batch.batch_id} (seed {simulation.seed}): {store.uri(landed.batch.key)}")
    if landed.warning():
        print(f"WARNING: {landed.warning()}", file=sys.stderr)
    return 0


def _given(**values: object) -> dict[str, object]:
    """Only the arguments the user gave (so dataclass defaults, e.g. a fresh seed, apply)."""
    return {name: value for name, value in values.items() if value is not None}


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
    import duckdb

    store = StorageSettings.from_env().open()
    features = FeatureStore(store)
    latest = features.latest()
    if latest is None:
        print(f"bridge: no feature version in {store.uri(features.prefix)} (BRIDGE_HOME or BRIDGE_S3_BUCKET "
              "picks the lake): land batches and materialize housing_features first", file=sys.stderr)
        return 1
    pinned = features.load(args.version) if args.version else latest
    if args.sql:
        try:
            print(features.connect(pinned).sql(args.sql))
        except duckdb.Error as error:
            first_line = str(error).strip().splitlines()[0]
            print(f"bridge: SQL error on version {pinned.version}: {first_line}", file=sys.stderr)
            return 2
        return 0
    if args.version:
        print(f"version {pinned.version}{' (latest)' if pinned.version == latest.version else ''}")
        print(f"  created {pinned.created_at}   contract {pinned.contract_version}   rows {pinned.rows}")
        print(f"  rows per split: {pinned.rows_per_split}")
        print(f"  manifest: {store.uri(f'{features.prefix}versions/{pinned.version}.json')}")
        for part in pinned.parts:
            print(f"  part {part.batch_id}: {part.rows} rows  {store.uri(part.key)}")
        return 0
    versions = sorted((features.load(v) for v in features.versions()), key=lambda v: v.created_at, reverse=True)
    for version in versions:  # newest first; * marks LATEST
        mark = "*" if latest.version == version.version else " "
        print(f"{mark} {version.version}  {version.created_at}  rows={version.rows}  splits={version.rows_per_split}")
    return 0


def _dagster(args: argparse.Namespace) -> int:
    """Run the `dagster` CLI on bridge's instance (DAGSTER_HOME set from BRIDGE_HOME, .env applied)."""
    import os
    import subprocess

    command = [sys.executable, "-m", "dagster", *args.dagster_args]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}", file=sys.stderr)
    return subprocess.run(command, check=False).returncode


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


def _registry():
    from bridge_assets.ml.registry import Registry
    from bridge_assets.ml.tracking import MlflowSettings

    settings = MlflowSettings.from_env()
    return Registry(settings.activate(), settings.model_name, StorageSettings.from_env().open())


def _promote(args: argparse.Namespace) -> int:
    from bridge_assets.ml.registry import PRODUCTION_ALIAS

    registry = _registry()
    previous = registry.promote_staging(args.version, override_reason=args.override_reason)
    print(f"{registry.model_name} v{registry.version_for(PRODUCTION_ALIAS)} is Production (previous: {previous or 'none'}); "
          "the registry sensor deploys it (or `make serve` / materialize production_deployment)")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    registry = _registry()
    current, restored = registry.rollback(args.reason)
    print(f"{registry.model_name}: Production rolled back from v{current} to v{restored}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from bridge_assets.ml.gates import PromotionSettings, approve

    registry = _registry()
    approve(registry, args.version, args.approver, args.reason, PromotionSettings.from_env())
    print(f"{registry.model_name} v{args.version} approved by {args.approver}; it is in Staging")
    return 0


def _history(args: argparse.Namespace) -> int:
    registry = _registry()
    for record in registry.history(args.version):
        print(record.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="land a simulated batch")
    simulate.add_argument("--rows", type=int, default=10_000)
    simulate.add_argument("--seed", type=int, help="default: a new random seed (printed; same seed, same rows)")
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
    features.add_argument("--version", help="describe (or with --sql query) this version (default: latest)")
    features.add_argument("--sql", help="DuckDB SQL over the view `features`")
    features.set_defaults(run=_features)
    dagster = commands.add_parser("dagster", help="the dagster CLI on bridge's instance, e.g. `bridge dagster run list`")
    dagster.add_argument("dagster_args", nargs=argparse.REMAINDER, help="arguments for `dagster`")
    dagster.set_defaults(run=_dagster)
    train = commands.add_parser("train", help="train a round on a feature version and log it to MLflow")
    train.add_argument("--preset", action="append", help="repeatable (default: default and reference)")
    train.add_argument("--split", choices=("hash", "reference"), default="hash")
    train.add_argument("--feature-version", help="default: latest")
    train.add_argument("--max-epochs", type=int)
    train.set_defaults(run=_train)

    promote = commands.add_parser("promote", help="move the Staging version to Production (needs an A/B verdict)")
    promote.add_argument("version", nargs="?", help="default: the version in Staging")
    promote.add_argument("--override-reason", help="promote without a 'promote' verdict, for this reason (recorded)")
    promote.set_defaults(run=_promote)
    rollback = commands.add_parser("rollback", help="point Production back at the previous version")
    rollback.add_argument("--reason", required=True, help="recorded in the audit trail")
    rollback.set_defaults(run=_rollback)
    approve = commands.add_parser("approve", help="sign off a version whose gates passed (BRIDGE_APPROVERS)")
    approve.add_argument("version")
    approve.add_argument("--approver", required=True)
    approve.add_argument("--reason", required=True)
    approve.set_defaults(run=_approve)
    history = commands.add_parser("history", help="print the registry's audit trail")
    history.add_argument("--version", help="only this model version")
    history.set_defaults(run=_history)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_environment()
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
