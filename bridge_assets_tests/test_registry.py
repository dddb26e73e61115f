"""Stages and the audit trail on a real MLflow registry and a real lake (local and moto's S3)."""

import mlflow
import pytest

from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import (
    AUDIT_PREFIX,
    CHAMPION_ALIAS,
    PRODUCTION_ALIAS,
    STAGE_TAG,
    STAGING_ALIAS,
    AuditRecord,
    PromotionRefused,
    Registry,
    create_exclusive,
    read_audit,
)
from bridge_assets.ml.tracking import MlflowSettings


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [1.0] * len(model_input)


@pytest.fixture
def registry(store: ObjectStore) -> Registry:
    settings = MlflowSettings.from_env()
    client = settings.activate()
    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="model", python_model=Constant()).model_uri
    registry = Registry(client, settings.model_name, store, actor="tester")
    registry.model_uri = uri  # type: ignore[attr-defined]
    return registry


def test_exclusive_create_never_overwrites(store: ObjectStore):
    create_exclusive(store, "registry/audit/x.json", b"first")
    with pytest.raises(FileExistsError):
        create_exclusive(store, "registry/audit/x.json", b"second")
    assert store.get_bytes("registry/audit/x.json") == b"first"
    assert store.list("registry/audit/") == ["registry/audit/x.json"]  # no temporary left behind


def test_every_transition_is_recorded_in_order_and_rollback_follows_the_trail(registry: Registry):
    v1, v2, v3 = (registry.register(registry.model_uri, {"bridge.run_id": "r"}) for _ in range(3))  # type: ignore[attr-defined]
    client, name = registry.client, registry.model_name
    assert client.get_model_version(name, v3).tags[STAGE_TAG] == "None"

    with pytest.raises(PromotionRefused, match="not in Staging"):
        registry.promote_staging(v1)
    registry.stage_version(v1, reason="gates passed", evidence={"gates": "all"})
    assert registry.version_for(STAGING_ALIAS) == v1
    assert registry.promote_staging(v1) is None  # first Production: nothing to compare against
    assert registry.version_for(STAGING_ALIAS) is None
    assert registry.version_for(PRODUCTION_ALIAS) == registry.version_for(CHAMPION_ALIAS) == v1

    registry.stage_version(v2, reason="gates passed", evidence={})
    with pytest.raises(PromotionRefused, match="needs an A/B verdict 'promote' against Production v1"):
        registry.promote_staging(v2)
    registry.record("ab_verdict", v2, reason="keep: no difference", evidence={"verdict": "keep"})
    with pytest.raises(PromotionRefused, match="latest verdict: keep"):
        registry.promote_staging(v2)
    registry.record("ab_verdict", v2, reason="staging better", evidence={"verdict": "promote"})
    assert registry.promote_staging(v2) == v1
    assert registry.stage(v1) == "Archived" and registry.stage(v2) == "Production"

    registry.stage_version(v3, reason="gates passed", evidence={})
    registry.promote_staging(v3, override_reason="hotfix approved by on-call")
    assert registry.production_lineage() == [v1, v2, v3]

    assert registry.rollback("bad latency") == (v3, v2)
    assert registry.rollback("still bad") == (v2, v1)
    with pytest.raises(PromotionRefused, match="no earlier Production version"):
        registry.rollback("again")
    assert registry.version_for(PRODUCTION_ALIAS) == v1 and registry.stage(v3) == "Archived"

    trail = registry.history()
    assert [(r.action, r.version) for r in trail] == [
        ("register", v1), ("register", v2), ("register", v3),
        ("stage", v1), ("promote", v1),
        ("stage", v2), ("ab_verdict", v2), ("ab_verdict", v2), ("archive", v1), ("promote", v2),
        ("stage", v3), ("archive", v2), ("promote", v3),
        ("archive", v3), ("rollback", v2), ("archive", v2), ("rollback", v1),
    ]  # fmt: skip
    override = next(r for r in trail if r.action == "promote" and r.version == v3)
    assert override.reason == "override: hotfix approved by on-call" and override.evidence["override"] is True
    assert all(r.actor == "tester" and r.schema_version == 1 and r.key.startswith(AUDIT_PREFIX) for r in trail)
    assert [r.key for r in trail] == sorted(r.key for r in trail)
    # Each record is stored as written and the version is tagged with its latest record.
    stored = AuditRecord.from_json(registry.store.get_text(trail[-1].key), trail[-1].key)
    assert stored == trail[-1] and stored.from_stage == "Archived" and stored.to_stage == "Production"
    assert client.get_model_version(name, v1).tags["bridge.last_audit"] == trail[-1].key
    assert [r.action for r in read_audit(registry.store, name, v3)] == ["register", "stage", "promote", "archive"]
