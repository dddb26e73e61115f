"""The code location loads cleanly and has the expected shape."""

import subprocess
import sys
import warnings

import dagster as dg

from bridge_assets.ml.tracking import PROJECT_ROOT


def test_definitions_load_without_deprecation_warnings():
    code = (
        "import warnings, dagster as dg\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "warnings.simplefilter('error', PendingDeprecationWarning)\n"
        "warnings.simplefilter('error', dg.SupersessionWarning)\n"
        "warnings.filterwarnings('ignore', category=DeprecationWarning, module='botocore')\n"
        # Ray Serve's own pydantic models warn at import (Field(update_type=...)); ours must not.
        "warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'ray\\.')\n"
        "from bridge_assets.definitions import defs\n"
        "defs = defs()\n"  # as Dagster loads the code location
        "defs.resolve_all_job_defs()\n"
        "defs.resolve_asset_graph()\n"
    )
    # A fresh interpreter, so modules imported by other tests cannot hide a warning.
    completed = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


ENVIRONMENT_READS_AT_IMPORT = """
import importlib, os, pkgutil, sys
ours = tuple(os.path.join(os.getcwd(), package, "") for package in ("bridge_assets", "serving"))
reads = set()

class Recording(type(os.environ)):
    \"\"\"os.environ, noting each read whose caller is a module of ours (not os itself).\"\"\"
    def _note(self, key):
        frame = sys._getframe(2)
        while frame and frame.f_code.co_filename.endswith(("/os.py", "_collections_abc.py")):
            frame = frame.f_back
        if frame and frame.f_code.co_filename.startswith(ours):
            if key == "BRIDGE_CONTRACT" and frame.f_code.co_filename.endswith("/bridge_assets/core/contract.py"):
                return  # the process's data set, chosen once, there alone
            reads.add(f"{frame.f_code.co_filename}:{frame.f_lineno} {key}")
    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)
    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)
    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

os.environ = Recording(os.environ._data, os.environ.encodekey, os.environ.decodekey, os.environ.encodevalue, os.environ.decodevalue)
modules = []
for package in ("bridge_assets", "serving"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
            modules.append(module.name)
assert len(modules) > 60 and "bridge_assets.definitions" in modules, modules
assert not reads, sorted(reads)
"""


def test_no_module_reads_the_environment_at_import():
    """Every module of `bridge_assets/` and `serving/` imported in a fresh interpreter reads no
    variable: settings come from the environment a caller passes (`build_defs(env)`, the
    settings' `from_env`), so a test or a second code location in one process gets its own. The
    one exception is the data contract (`BRIDGE_CONTRACT`), read by `core/contract.py` alone: its
    columns are the process's data set, in every module's constants."""
    completed = subprocess.run(
        [sys.executable, "-c", ENVIRONMENT_READS_AT_IMPORT], capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_core_imports_without_dagster_or_ray():
    code = (
        "import sys\n"
        "import bridge_assets.core.contract, bridge_assets.core.features, bridge_assets.core.simulator\n"
        "import bridge_assets.lake.feature_store, bridge_assets.lake.settings\n"
        "import bridge_assets.core.training, bridge_assets.core.pyfunc, bridge_assets.ml.round, bridge_assets.ml.tracking\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dagster', 'ray', 'bridge_assets.definitions')]\n"
        "assert not bad, bad\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_loading_the_definitions_does_not_import_torch():
    """Every Dagster run, sensor evaluation and code server loads the definitions; torch is only
    for the processes that train or load a network (it was a third of that load's CPU)."""
    code = "import sys, bridge_assets.definitions as d; d.defs; assert 'torch' not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_asset_graph_shape():
    with warnings.catch_warnings():
        from bridge_assets.definitions import build_defs
    defs = build_defs()
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {
        "simulated_batch", "raw_housing", "housing_features", "candidate_model", "staged_model", "feedback",
        "ab_report", "production_deployment", "batch_predictions", "interaction_logs", "interaction_profiles",
        "window_profiles", "labelled_traffic", "drift_report", "model_reference",
    }  # fmt: skip
    parents = {key: {p.to_user_string() for p in graph.get(dg.AssetKey(key)).parent_keys} for key in keys}
    assert parents["housing_features"] == {"raw_housing"}
    assert parents["candidate_model"] == {"housing_features", "drift_report"}  # the monitor feeds retraining
    assert parents["staged_model"] == {"candidate_model", "housing_features"}
    assert parents["production_deployment"] == {"candidate_model"}
    assert parents["drift_report"] == {"window_profiles", "labelled_traffic"}  # logs and labels feed the monitor
    checks = {key.name for key in graph.asset_check_keys}
    gates = {"baseline", "champion", "signature", "edge_probe", "slices", "latency", "model_card"}
    monitor = {"no_feature_drift", "no_prediction_drift", "no_realised_decay", "no_estimated_decay"}
    data = {"schema", "no_nulls", "row_count", "split_proportions", "batches_add_rows", "quarantine_rate"}
    assert checks == gates | monitor | data | {"registry_authorised", "serving_matches_registry"}
    assert defs.resolve_job_def("promote_model").name == "promote_model"
    sensors = {s.name: s for s in defs.sensors}
    assert sensors["landed_batches_sensor"].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors["bridge_automation"].default_status == dg.DefaultSensorStatus.RUNNING
    assert all(sensor.default_status == dg.DefaultSensorStatus.RUNNING for sensor in sensors.values()), sensors
    assert set(sensors) >= {"feature_backlog_sensor", "registry_sensor", "post_deploy_guardrail", "interaction_logs_sensor", "retrain_sensor",
                            "candidates_sensor", "experiment_sensor", "freshness_sensor"}  # fmt: skip


def test_groups_follow_the_architecture():
    with warnings.catch_warnings():
        from bridge_assets.definitions import build_defs
    defs = build_defs()
    graph = defs.resolve_asset_graph()
    expected = {
        "simulated_batch": "ingestion", "raw_housing": "ingestion", "housing_features": "features",
        "candidate_model": "training", "staged_model": "registry", "ab_report": "registry",
        "production_deployment": "serving", "batch_predictions": "serving", "drift_report": "monitoring",
    }  # fmt: skip
    for key, group in expected.items():
        assert graph.get(dg.AssetKey(key)).group_name == group, key
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert (bool(node.owners), bool(node.kinds), bool(node.description)) == (True, True, True), key
    # The loop in the lineage: logs and labels feed the monitor, the monitor feeds retraining.
    parents = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert "interaction_logs" in parents["interaction_profiles"] and "interaction_logs" in parents["feedback"]
    assert "feedback" in parents["labelled_traffic"] and "drift_report" in parents["candidate_model"]
    assert graph.get(dg.AssetKey("batch_predictions")).parent_keys == {dg.AssetKey("raw_housing")}
    assert defs.resolve_schedule_def("training_round_schedule").default_status == dg.DefaultScheduleStatus.RUNNING


def test_secrets_reach_dagster_only_as_env_vars():
    from bridge_assets.defs.resources import lake_storage

    env = {
        "BRIDGE_S3_BUCKET": "b",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "t0k",
    }
    resource = lake_storage(env)
    assert isinstance(resource.aws_secret_access_key, dg.EnvVar) and isinstance(resource.aws_session_token, dg.EnvVar)
    assert "t0k" not in repr(resource.model_dump())
    assert "s3cr3t" not in repr(resource.model_dump())


def test_resources_carry_their_settings_classes_fields_and_give_them_back():
    """A resource built from settings hands back equal settings (tuples and Literals included),
    and Dagster's launchpad shows each field with the settings class's description."""
    from bridge_assets.defs import resources

    env = {"BRIDGE_APPROVERS": "alice,bob", "BRIDGE_TRAINING_LAUNCHER": "docker", "BRIDGE_SERVE_PORT": "8123"}
    for factory in (
        resources.promotion_policy,
        resources.training_launcher,
        resources.ray_serving,
        resources.mlflow_tracking,
    ):
        resource = factory(env)
        settings = resource.settings()
        assert type(settings).from_env({**env, **settings.to_env()}) == settings, factory.__name__
        schema = type(resource).to_config_schema().as_field().config_type.fields
        assert set(schema) == set(type(settings).model_fields), factory.__name__
        described = {name: field.description for name, field in schema.items()}
        assert described == {name: info.description for name, info in type(settings).model_fields.items()}
    assert resources.promotion_policy(env).settings().approvers == ("alice", "bob")
    assert resources.training_launcher(env).client().__class__.__name__ == "PipesDockerClient"
