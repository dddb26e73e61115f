"""`bridge`: the loop from a shell — check a data contract, land data (simulate, land-seed,
release-labels), inspect features, train, send traffic and release its feedback, move versions
through the registry (approve, promote, rollback, history), monitor, and `bridge dagster …` on
bridge's instance.

Talks to the lake, MLflow and service configured by the environment (see the README's
configuration table), without Dagster: its sensors notice what the commands land or register.
Each command imports only what it needs, so `--help` and the registry commands stay quick.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bridge_assets.lake.settings import StorageSettings, load_environment

if TYPE_CHECKING:
    from bridge_assets.core.simulator import Drift
    from bridge_assets.ml.registry import Registry


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

    from bridge_assets.lake.landing import Simulation, land_simulated

    store = StorageSettings.from_env().open()
    simulation = Simulation(
        args.rows,
        drift=_drift(args),
        corrupt_fraction=args.corrupt_fraction,
        case_noise=args.case_noise,
        withhold_labels=args.withhold_labels,
    )
    if args.seed is not None:  # else the dataclass's fresh seed
        simulation = replace(simulation, seed=args.seed)
    with tqdm(total=args.rows, unit="rows", unit_scale=True, disable=args.quiet) as progress:
        landed = land_simulated(store, simulation, args.batch_id, fmt=args.format, on_block=progress.update)
    print(
        f"landed {landed.rows} rows as batch {landed.batch.batch_id} (seed {simulation.seed}): {store.uri(landed.batch.key)}"
    )
    if landed.warning():
        print(f"WARNING: {landed.warning()}", file=sys.stderr)
    return 0


def _drift(args: argparse.Namespace) -> Drift:
    from bridge_assets.core.simulator import Drift

    return Drift(
        shift=_pairs(args.shift),
        scale=_pairs(args.scale),
        area_factor=args.area_factor,
        price_factor=args.price_factor,
        concept=_pairs(args.concept),
    )


def _add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--area-factor", type=float, default=1.0, help="covariate shift: multiply every area")
    parser.add_argument("--price-factor", type=float, default=1.0, help="label shift: multiply every price")
    parser.add_argument(
        "--shift", nargs="*", default=[], metavar="FEATURE=SD", help="latent shift of a feature, in SDs"
    )
    parser.add_argument("--scale", nargs="*", default=[], metavar="FEATURE=FACTOR", help="latent spread of a feature")
    parser.add_argument(
        "--concept",
        nargs="*",
        default=[],
        metavar="FEATURE=FACTOR",
        help="concept drift: multiply a feature's price effect",
    )


def _traffic(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bridge_assets.ml.traffic import send_traffic
    from serving.deploy import ServingSettings
    from serving.guards import load_api_keys

    url = args.url or ServingSettings.from_env().url
    api_key = args.api_key or next((key.decode() for key in load_api_keys()), None)
    store = StorageSettings.from_env().open()
    total = max(1, round(args.rate * args.duration))
    with tqdm(total=total, unit="req", disable=args.quiet) as progress:
        result = send_traffic(
            store,
            url,
            rate=args.rate,
            duration=args.duration,
            clients=args.clients,
            seed=args.seed,
            drift=_drift(args),
            traffic_id=args.traffic_id,
            on_reply=progress.update,
            api_key=api_key,
        )
    print(
        f"traffic {result.traffic_id}: {result.sent} requests to {url}/predict, statuses {dict(result.statuses)}, "
        f"variants {dict(result.variants)}"
    )
    for failure in result.failures:
        print(f"  failed: {failure}", file=sys.stderr)
    if 401 in result.statuses:
        print(
            "  401: the service wants an API key: --api-key, or BRIDGE_API_KEYS / BRIDGE_API_KEYS_FILE", file=sys.stderr
        )
    if result.labels_withheld:
        print(
            f"true prices of the {result.labels_withheld} answered requests withheld at {store.uri(result.withheld_key)}; "
            f"release them with `bridge release-feedback {result.traffic_id}`"
        )
    else:
        print("no request was answered: no true prices withheld")
    return 0 if result.ok == result.sent else 1


def _release_feedback(args: argparse.Namespace) -> int:
    from bridge_assets.lake.feedback import release_feedback

    store = StorageSettings.from_env().open()
    key, rows = release_feedback(store, args.traffic_id, args.fraction, args.seed)
    print(f"released {rows} labels: {store.uri(key)}")
    return 0


def _land_seed(_: argparse.Namespace) -> int:
    from bridge_assets.lake.landing import land_seed

    store = StorageSettings.from_env().open()
    batch = land_seed(store)
    print(f"landed the real data: {store.uri(batch.key)}" if batch else "the real data has already landed")
    return 0


def _land(args: argparse.Namespace) -> int:
    """Land a file of the team's own rows as one batch, as it is: validation comes after."""
    import polars as pl

    from bridge_assets.lake.landing import land_batch

    csv = args.file.suffix.lower() == ".csv"
    frame = pl.read_csv(args.file, infer_schema=False) if csv else pl.read_parquet(args.file)
    store = StorageSettings.from_env().open()
    batch, rows = land_batch(store, args.batch_id or args.file.stem, [frame], fmt="csv" if csv else "parquet")
    print(f"landed {rows} rows as batch {batch.batch_id}: {store.uri(batch.key)}")
    return 0


def _release_labels(args: argparse.Namespace) -> int:
    from bridge_assets.lake.landing import release_labels

    store = StorageSettings.from_env().open()
    print(f"landed labels: {store.uri(release_labels(store, args.batch_id))}")
    return 0


def _features(args: argparse.Namespace) -> int:
    import duckdb

    from bridge_assets.lake.feature_store import FeatureStore

    store = StorageSettings.from_env().open()
    features = FeatureStore(store)
    latest = features.latest()
    if latest is None:
        print(
            f"bridge: no feature version in {store.uri(features.prefix)} (BRIDGE_HOME or BRIDGE_S3_BUCKET "
            "picks the lake): land batches and materialize housing_features first",
            file=sys.stderr,
        )
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


def _contract(args: argparse.Namespace) -> int:
    """Check a contract file before anything runs, a CSV against it, and the API request it defines."""
    import json

    import polars as pl

    from bridge_assets.core.contract import CONTRACT_PATH, Contract
    from bridge_assets.core.contract_spec import describe, load_contract

    path = args.path or CONTRACT_PATH
    spec = load_contract(path)
    print(f"{path}: a valid contract")
    print("\n".join(describe(spec)))
    if args.data:
        frame = pl.read_csv(args.data, infer_schema=False)  # text, as landing reads a CSV batch
        if spec.row_id not in frame.columns:  # landing numbers the rows of a batch without ids
            frame = frame.with_row_index(spec.row_id).with_columns(pl.col(spec.row_id).cast(pl.String))
        checked = Contract(spec).validate(frame)
        print(
            f"{args.data}: {frame.height} rows, {checked.valid.height} valid, {checked.quarantined.height} quarantined"
        )
        for reason, count in checked.reason_counts().items():
            print(f"  {count} × {reason}")
    if args.schema:
        from serving.schemas import request_model

        print(json.dumps(request_model(spec).model_json_schema(), indent=2))
    return 0


def _dagster(args: argparse.Namespace) -> int:
    """Run the `dagster` CLI on bridge's instance (DAGSTER_HOME set from BRIDGE_HOME, .env applied)."""
    import os
    import subprocess

    command = [sys.executable, "-m", "dagster", *args.dagster_args]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}", file=sys.stderr)
    return subprocess.run(command, check=False).returncode


def _train(args: argparse.Namespace) -> int:
    from bridge_assets.core.presets import preset
    from bridge_assets.lake.feature_store import FeatureStore
    from bridge_assets.ml.container import TrainingSettings
    from bridge_assets.ml.round import run_round
    from bridge_assets.ml.tracking import MlflowSettings, log_round

    features = FeatureStore(StorageSettings.from_env().open())
    version = args.feature_version or (features.latest() or sys.exit("no feature version yet")).version
    trainer = args.trainer or TrainingSettings.from_env().trainer
    overrides = {k: v for k, v in (("max_epochs", args.max_epochs), ("trainer", trainer)) if v}
    result = run_round(features.scan(version).collect(), [preset(p, **overrides) for p in args.preset], args.split)
    record = log_round(MlflowSettings.from_env(), result, feature_version=version)
    for candidate in result.candidates:
        print(f"{candidate.config.name:>12}: " + "  ".join(f"{k}={v:,.4g}" for k, v in candidate.metrics.items()))
    for name, scores in result.baselines.items():
        print(f"{name:>12}: " + "  ".join(f"{k}={v:,.4g}" for k, v in scores.items()))
    if not record.new_version:
        print(f"nothing new registered: {record.model_uri} has the same data and configuration")
        return 0
    print(
        f"registered {record.model_uri} ({record.best_name}) as candidate; with `make dev` running, "
        "`candidates_sensor` puts it through the gates within a minute (else: "
        "`bridge dagster asset materialize --select staged_model -m bridge_assets.definitions`)"
    )
    return 0


def _registry() -> Registry:
    from bridge_assets.ml.registry import Registry
    from bridge_assets.ml.tracking import MlflowSettings

    settings = MlflowSettings.from_env()
    return Registry(settings.activate(), settings.model_name, StorageSettings.from_env().open())


def _promote(args: argparse.Namespace) -> int:
    from bridge_assets.ml.registry import PRODUCTION_ALIAS

    registry = _registry()
    previous = registry.promote_staging(args.version, override_reason=args.override_reason)
    print(
        f"{registry.model_name} v{registry.version_for(PRODUCTION_ALIAS)} is Production (previous: {previous or 'none'}); "
        "the registry sensor deploys it (or `make serve` / materialize production_deployment)"
    )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    registry = _registry()
    current, restored = registry.rollback(args.reason)
    print(f"{registry.model_name}: Production rolled back from v{current} to v{restored}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from bridge_assets.ml.gates import approve
    from bridge_assets.ml.promotion_settings import PromotionSettings

    registry = _registry()
    approve(registry, args.version, args.approver, args.reason, PromotionSettings.from_env())
    print(f"{registry.model_name} v{args.version} approved by {args.approver}; it is in Staging")
    return 0


def _history(args: argparse.Namespace) -> int:
    registry = _registry()
    records = registry.history(args.version)
    if not records:
        print(
            f"bridge: no audit records for {registry.model_name}" + (f" v{args.version}" if args.version else ""),
            file=sys.stderr,
        )
        return 1
    for record in records:
        print(record.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="land a simulated batch", formatter_class=defaults)
    simulate.add_argument("--rows", type=int, default=10_000, help="rows in the batch")
    simulate.add_argument("--seed", type=int, help="default: a new random seed (printed; same seed, same rows)")
    simulate.add_argument("--batch-id", help="default: sim-<time>-s<seed>")
    simulate.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="file format landed")
    simulate.add_argument(
        "--corrupt-fraction", type=float, default=0.0, help="share of rows that break the contract (quarantined)"
    )
    simulate.add_argument("--case-noise", type=float, default=0.0, help="share of rows with oddly-cased categories")
    simulate.add_argument("--withhold-labels", action="store_true", help="land prices later (release-labels)")
    _add_drift_arguments(simulate)
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(run=_simulate)

    commands.add_parser("land-seed", help="land the contract's real data (its seed_data)").set_defaults(run=_land_seed)
    land = commands.add_parser("land", help="land a CSV or Parquet file of your own rows as a batch")
    land.add_argument("file", type=Path, help="rows with the contract's columns (a row id is added if absent)")
    land.add_argument("--batch-id", help="default: the file's name without its suffix")
    land.set_defaults(run=_land)

    traffic = commands.add_parser(
        "traffic", help="simulated clients sending houses to the service", formatter_class=defaults
    )
    traffic.add_argument("--url", help="service URL (default: BRIDGE_SERVE_HOST/PORT)")
    traffic.add_argument(
        "--api-key", help="sent as X-API-Key (default: the first of BRIDGE_API_KEYS / BRIDGE_API_KEYS_FILE)"
    )
    traffic.add_argument("--rate", type=float, default=20.0, help="requests per second")
    traffic.add_argument("--duration", type=float, default=30.0, help="seconds")
    traffic.add_argument("--clients", type=int, default=200, help="distinct X-Client-ID values")
    traffic.add_argument("--seed", type=int, default=0)
    traffic.add_argument("--traffic-id", help="default: traffic-<time>-s<seed>")
    traffic.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_drift_arguments(traffic)
    traffic.set_defaults(run=_traffic)

    feedback = commands.add_parser(
        "release-feedback", help="release the withheld true prices of a traffic run", formatter_class=defaults
    )
    feedback.add_argument("traffic_id")
    feedback.add_argument("--fraction", type=float, default=1.0, help="release a random share only")
    feedback.add_argument("--seed", type=int, default=0)
    feedback.set_defaults(run=_release_feedback)

    labels = commands.add_parser("release-labels", help="land a simulated batch's withheld labels")
    labels.add_argument("batch_id")
    labels.set_defaults(run=_release_labels)

    features = commands.add_parser("features", help="list feature versions or query one with SQL")
    features.add_argument("--version", help="describe (or with --sql query) this version (default: latest)")
    features.add_argument("--sql", help="DuckDB SQL over the view `features`")
    features.set_defaults(run=_features)
    contract = commands.add_parser(
        "contract", help="check a data contract file, and a CSV against it", formatter_class=defaults
    )
    contract.add_argument(
        "path", nargs="?", type=Path, help="the contract (TOML); default: BRIDGE_CONTRACT's, else housing"
    )
    contract.add_argument("--data", type=Path, help="a CSV to check: rows valid and quarantined, with the reasons")
    contract.add_argument("--schema", action="store_true", help="print the JSON schema of the API request it defines")
    contract.set_defaults(run=_contract)
    dagster = commands.add_parser(
        "dagster", help="the dagster CLI on bridge's instance, e.g. `bridge dagster run list`"
    )
    dagster.add_argument("dagster_args", nargs=argparse.REMAINDER, help="arguments for `dagster`")
    dagster.set_defaults(run=_dagster)
    train = commands.add_parser(
        "train", help="train a round on a feature version and log it to MLflow", formatter_class=defaults
    )
    train.add_argument("--preset", action="append", help="repeatable (default: default and reference)")
    train.add_argument("--split", choices=("hash", "reference"), default="hash")
    train.add_argument("--feature-version", help="default: latest")
    train.add_argument("--max-epochs", type=int)
    train.add_argument(
        "--trainer",
        help="entry point package.module:function that trains every preset (default: BRIDGE_TRAINER, else each preset's)",
    )
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
    monitor = commands.add_parser(
        "monitor", help="profile new interaction logs and report drift and decay per window", formatter_class=defaults
    )
    monitor.add_argument(
        "--window", action="append", default=[], help="window id (repeatable); default: the newest --last"
    )
    monitor.add_argument("--last", type=int, default=3, help="how many of the newest windows to report")
    monitor.add_argument(
        "--reference", action="append", default=[], help="first make the reference of this model version"
    )
    monitor.set_defaults(run=_monitor)
    return parser


def _monitor(args: argparse.Namespace) -> int:
    """What the monitoring sensors do, once, from a shell; exit 1 when a window alarms."""
    from bridge_assets.ml.tracking import MlflowSettings
    from bridge_assets.monitoring.monitor import profile_objects, report_window, unprofiled_objects
    from bridge_assets.monitoring.profiles import windows_with_members
    from bridge_assets.monitoring.reference import make_reference_profile
    from bridge_assets.monitoring.settings import MonitorSettings

    store = StorageSettings.from_env().open()
    settings, tracking = MonitorSettings.from_env(), MlflowSettings.from_env()
    for version in args.reference:
        reference = make_reference_profile(store, tracking, version)
        print(
            f"reference of v{version}: held-out RMSE {reference.metrics['rmse']:,.0f} on {reference.heldout_rows} rows"
        )
    profiled = profile_objects(store, unprofiled_objects(store), settings.window_seconds)
    print(f"profiled {len(profiled)} new interaction-log objects")
    alarmed = False
    for window in args.window or sorted(windows_with_members(store))[-args.last :]:
        report, keys = report_window(store, window, settings, tracking.model_name)
        alarmed |= bool(report.alarms)
        print(f"{window}: {'; '.join(a.text for a in report.alarms) or 'no alarms'}\n  {store.uri(keys['html'])}")
    return 1 if alarmed else 0


def _user_error(error: Exception) -> str | None:
    """The message of an error the user can act on (bad input, missing data, MLflow refusing)."""
    if isinstance(error, KeyError):
        return str(error.args[0]) if error.args else "not found"
    if isinstance(error, ValueError | FileExistsError | FileNotFoundError):
        return str(error)
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # imported only by commands that use MLflow
    if mlflow_exceptions is not None and isinstance(error, mlflow_exceptions.MlflowException):
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    load_environment()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dagster"]:  # everything after it is Dagster's, `--help` included
        return _dagster(argparse.Namespace(dagster_args=argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "train" and not args.preset:
        args.preset = ["default", "reference"]
    try:
        return args.run(args)
    except Exception as error:
        message = _user_error(error)
        if message is None:
            raise
        print(f"bridge: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
