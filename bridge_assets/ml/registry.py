"""The model registry's stages and their audit trail (steps 4–7).

The reference's stages None → Staging → Production live in MLflow as aliases (`candidate`,
`staging`, `production`, and `champion` kept equal to `production` for the reference's
clients) plus the version tag `bridge.stage`; MLflow's own stage API is deprecated and unused.
MLflow keeps no alias history, so every transition also appends one immutable JSON record to
the lake under `registry/audit/`, written with an exclusive create (a record is never
rewritten), and tags the version with the record's key. Rollback reads the trail to find the
version Production had before.
"""

from __future__ import annotations

import getpass
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bridge_assets.lake.storage import ObjectStore

CANDIDATE_ALIAS = "candidate"
STAGING_ALIAS = "staging"
PRODUCTION_ALIAS = "production"
CHAMPION_ALIAS = "champion"
STAGE_TAG = "bridge.stage"
AUDIT_TAG = "bridge.last_audit"
AUDIT_PREFIX = "registry/audit/"
AUDIT_SCHEMA_VERSION = 1
# `bridge.stage` values (the reference's stage names).
NONE, STAGING, PRODUCTION, ARCHIVED = "None", "Staging", "Production", "Archived"


class PromotionRefused(ValueError):
    """A transition the policy does not allow; the message says what evidence is missing."""


@dataclass(frozen=True)
class AuditRecord:
    """One registry transition as written to `registry/audit/<time>-<id>.json`."""

    at: str
    actor: str
    model_name: str
    version: str
    from_stage: str | None
    to_stage: str | None
    action: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    schema_version: int = AUDIT_SCHEMA_VERSION
    key: str = ""  # where it was read from (not part of the stored record)

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("key")
        return json.dumps(record, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, key: str = "") -> AuditRecord:
        data = json.loads(text)
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__ if name != "key"}, key=key)

    def line(self) -> str:
        """One human-readable line for `bridge history` and the UI."""
        move = f"{self.from_stage or '-'} → {self.to_stage or '-'}"
        reason = f"  ({self.reason})" if self.reason else ""
        return f"{self.at}  v{self.version:<4} {self.action:<14} {move:<24} by {self.actor}{reason}"


def current_actor(env: Mapping[str, str] = os.environ) -> str:
    """Who acts: `BRIDGE_ACTOR` when set (e.g. by automation), else the OS user."""
    try:
        return env.get("BRIDGE_ACTOR") or getpass.getuser()
    except OSError:  # no user name in some containers
        return "unknown"


def create_exclusive(store: ObjectStore, key: str, data: bytes) -> None:
    """Write `key` only if it does not exist (FileExistsError otherwise), atomically: a hard link
    on disk, a conditional PUT (`If-None-Match: *`) on S3 (see `ObjectStore`)."""
    store.put_bytes(key, data, exclusive=True)


def write_audit(store: ObjectStore, record: AuditRecord) -> AuditRecord:
    """Append `record` to the trail; keys sort in time order (UTC microseconds, then a random id)."""
    key = f"{AUDIT_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.json"
    create_exclusive(store, key, record.to_json().encode())
    return AuditRecord(**{**asdict(record), "key": key})


def read_audit(store: ObjectStore, model_name: str | None = None, version: str | None = None) -> list[AuditRecord]:
    """The trail in the order it was written, optionally for one model (and version)."""
    records = [
        AuditRecord.from_json(store.get_text(key), key) for key in store.list(AUDIT_PREFIX) if key.endswith(".json")
    ]
    return [
        r
        for r in records
        if (model_name is None or r.model_name == model_name) and (version is None or r.version == str(version))
    ]


@dataclass(frozen=True)
class Authorisation:
    """May the version behind an alias be deployed, and why."""

    alias: str
    version: str | None
    allowed: bool
    out_of_band: bool
    reason: str
    newly_recorded: bool = False  # this call wrote the out-of-band record (tell people once)


class Registry:
    """Stages of one registered model: aliases, `bridge.stage` tags and the audit trail."""

    def __init__(self, client: MlflowClient, model_name: str, store: ObjectStore, actor: str | None = None) -> None:
        self.client = client
        self.model_name = model_name
        self.store = store
        self.actor = actor or current_actor()

    def version_for(self, alias: str) -> str | None:
        """The version behind `alias`, or None when it is unset."""
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def stage(self, version: str) -> str:
        return self.client.get_model_version(self.model_name, str(version)).tags.get(STAGE_TAG, NONE)

    def history(self, version: str | None = None) -> list[AuditRecord]:
        return read_audit(self.store, self.model_name, version)

    def record(
        self,
        action: str,
        version: str,
        *,
        from_stage: str | None = None,
        to_stage: str | None = None,
        reason: str = "",
        evidence: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append a record for `version` and tag the version with its key."""
        written = write_audit(
            self.store,
            AuditRecord(
                at=datetime.now(UTC).isoformat(),
                actor=self.actor,
                model_name=self.model_name,
                version=str(version),
                from_stage=from_stage,
                to_stage=to_stage,
                action=action,
                reason=reason,
                evidence=dict(evidence or {}),
            ),
        )
        self.client.set_model_version_tag(self.model_name, str(version), AUDIT_TAG, written.key)
        return written

    def _set_stage(self, version: str, stage: str) -> None:
        self.client.set_model_version_tag(self.model_name, str(version), STAGE_TAG, stage)

    def register(self, model_uri: str, tags: Mapping[str, str]) -> str:
        """Register a logged model as a new version: alias `candidate`, stage None, recorded."""
        version = str(mlflow.register_model(model_uri, self.model_name, tags={**tags, STAGE_TAG: NONE}).version)
        self.client.set_registered_model_alias(self.model_name, CANDIDATE_ALIAS, version)
        self.record(
            "register", version, to_stage=NONE, evidence={"model_uri": model_uri, "run_id": tags.get("bridge.run_id")}
        )
        return version

    def stage_version(self, version: str, *, reason: str, evidence: Mapping[str, Any]) -> str | None:
        """Point `staging` at `version` (its gates passed); the version staged before, if any,
        goes back to stage None unless it has since become Production. Returns that version."""
        version = str(version)
        previous = self.version_for(STAGING_ALIAS)
        from_stage = self.stage(version)
        self.client.set_registered_model_alias(self.model_name, STAGING_ALIAS, version)
        self._set_stage(version, STAGING)
        if previous and previous != version and self.stage(previous) == STAGING:
            self._set_stage(previous, NONE)
        self.record("stage", version, from_stage=from_stage, to_stage=STAGING, reason=reason, evidence=evidence)
        return previous

    def unstage(self, reason: str) -> str | None:
        """End the experiment: `staging` is removed and its version goes back to stage None
        (recorded). Returns that version, if any."""
        version = self.version_for(STAGING_ALIAS)
        if version is None:
            return None
        self.client.delete_registered_model_alias(self.model_name, STAGING_ALIAS)
        self._set_stage(version, NONE)
        self.record("unstage", version, from_stage=STAGING, to_stage=NONE, reason=reason)
        return version

    def set_production(
        self, version: str, *, action: str = "promote", reason: str = "", evidence: Mapping[str, Any] | None = None
    ) -> str | None:
        """Point `production` and `champion` at `version` (stage Production); the version they
        pointed at before is archived. Recorded. Returns that previous version, if any."""
        version = str(version)
        from_stage = self.stage(version)  # also fails clearly for an unknown version
        previous = self.version_for(PRODUCTION_ALIAS)
        for alias in (PRODUCTION_ALIAS, CHAMPION_ALIAS):
            self.client.set_registered_model_alias(self.model_name, alias, version)
        self._set_stage(version, PRODUCTION)
        if self.version_for(STAGING_ALIAS) == version:
            self.client.delete_registered_model_alias(self.model_name, STAGING_ALIAS)
        evidence = {**(evidence or {}), "previous_production": previous}
        if previous and previous != version:
            self._set_stage(previous, ARCHIVED)
            self.record("archive", previous, from_stage=PRODUCTION, to_stage=ARCHIVED, reason=f"replaced by v{version}")
        self.record(action, version, from_stage=from_stage, to_stage=PRODUCTION, reason=reason, evidence=evidence)
        return previous

    def production_lineage(self) -> list[str]:
        """Versions Production went through, oldest first, with rolled-back ones removed:
        the last entry is the current one, the one before it is where a rollback goes."""
        stack: list[str] = []
        for record in self.history():
            if record.to_stage != PRODUCTION or (
                record.action == "out_of_band" and not record.evidence.get("deployable")
            ):
                continue
            if record.action == "rollback" and len(stack) >= 2 and stack[-2] == record.version:
                stack.pop()
            else:
                stack.append(record.version)
        return stack

    def rollback(self, reason: str) -> tuple[str, str]:
        """Point Production back at the version it had before the current one (from the trail).
        Returns (rolled-back version, restored version)."""
        current = self.version_for(PRODUCTION_ALIAS)
        lineage = self.production_lineage()
        if current is None or len(lineage) < 2 or lineage[-1] != current:
            raise PromotionRefused(
                f"no earlier Production version of {self.model_name} to roll back to "
                f"(current: {current or 'none'}; recorded Production history: {lineage or 'empty'})"
            )
        target = lineage[-2]
        self.set_production(target, action="rollback", reason=reason or "rollback", evidence={"rolled_back": current})
        return current, target

    def approved(self, version: str) -> bool:
        return any(r.action == "approve" for r in self.history(version))

    def gate_record(self, version: str) -> AuditRecord | None:
        """The latest gate evaluation of `version`, if any."""
        gates = [r for r in self.history(version) if r.action in ("gates_passed", "gates_failed")]
        return gates[-1] if gates else None

    def verdict(self, version: str) -> AuditRecord | None:
        """The latest A/B verdict recorded for `version` as the staging variant."""
        verdicts = [r for r in self.history(version) if r.action == "ab_verdict"]
        return verdicts[-1] if verdicts else None

    def authorise(self, alias: str) -> Authorisation:
        """Whether the version behind `alias` may be served: moved there by bridge (the trail's
        last move to that stage names it), or moved outside bridge but with a passing gate
        record. An out-of-band move is recorded once."""
        stage = PRODUCTION if alias == PRODUCTION_ALIAS else STAGING
        version = self.version_for(alias)
        if version is None:
            return Authorisation(alias, None, True, False, f"no version behind `{alias}`")
        moves = [r for r in self.history() if r.to_stage == stage and r.action != "out_of_band"]
        if moves and moves[-1].version == version:
            return Authorisation(
                alias, version, True, False, f"v{version} set by bridge ({moves[-1].action} by {moves[-1].actor})"
            )
        gates = self.gate_record(version)
        passed = gates is not None and gates.action == "gates_passed"
        reason = f"`{alias}` was moved to v{version} outside bridge; " + (
            f"v{version} passed its gates ({gates.key}), so it may be served"
            if gates is not None and passed
            else f"v{version} has no passing gate record ({gates.reason if gates else 'never evaluated'}): not deployed"
        )
        already = [r for r in self.history(version) if r.action == "out_of_band" and r.to_stage == stage]
        record = not already or (moves and already[-1].key < moves[-1].key)
        if record:
            self.record(
                "out_of_band",
                version,
                from_stage=self.stage(version),
                to_stage=stage,
                reason=reason,
                evidence={"alias": alias, "gate_record": gates.key if gates else None, "deployable": passed},
            )
        return Authorisation(alias, version, passed, True, reason, newly_recorded=bool(record))

    def promote_staging(self, version: str | None = None, *, override_reason: str | None = None) -> str | None:
        """Staging → Production, only with evidence: the version is in Staging (its gates
        passed) and either an A/B verdict says promote, or there is no Production yet to
        compare with, or an operator gives an override reason (recorded). Returns the previous
        Production version."""
        staged = self.version_for(STAGING_ALIAS)
        version = str(version or staged or "")
        if not version or version != staged:
            raise PromotionRefused(
                f"v{version or '?'} is not in Staging (staging: {staged or 'none'}); only a version that passed the gates can be promoted"
            )
        production = self.version_for(PRODUCTION_ALIAS)
        verdict = self.verdict(version)
        evidence: dict[str, Any] = {}
        if verdict is not None and verdict.evidence.get("verdict") == "promote":
            reason, evidence = (
                f"A/B verdict promote ({verdict.reason})",
                {"verdict_record": verdict.key, **verdict.evidence},
            )
        elif override_reason:
            reason, evidence = (
                f"override: {override_reason}",
                {"override": True, "verdict_record": verdict.key if verdict else None},
            )
        elif production is None:
            reason = "first Production version: nothing to compare against"
        else:
            found = f"latest verdict: {verdict.evidence.get('verdict')}" if verdict else "no A/B verdict recorded"
            raise PromotionRefused(
                f"v{version} needs an A/B verdict 'promote' against Production v{production} ({found}). A verdict comes "
                "from the `ab_report` asset once labels of the experiment's traffic are released (`bridge release-feedback "
                "<traffic id>`, then materialize ab_report in the UI or `bridge dagster asset materialize --select "
                "ab_report -m bridge_assets.definitions`); or promote with an override reason (recorded)"
            )
        gates = self.gate_record(version)
        evidence["gate_record"] = gates.key if gates else None
        return self.set_production(version, reason=reason, evidence=evidence)


def promote_to_production(
    client: MlflowClient, model_name: str, version: str, *, store: ObjectStore | None = None, reason: str = "operator"
) -> str | None:
    """Mark `version` Production directly (recorded), without the Staging evidence policy:
    the mechanism under `Registry.promote_staging`, kept for fixtures and tooling."""
    if store is None:
        from bridge_assets.lake.settings import StorageSettings

        store = StorageSettings.from_env().open()
    return Registry(client, model_name, store).set_production(version, reason=reason)
