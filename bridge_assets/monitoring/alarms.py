"""A window's findings as data: what the retrain policy and alerts act on, free of the report's
profiling machinery (the policy imports this, not the report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

AlarmKind = Literal["feature drift", "prediction drift", "realised decay", "estimated decay"]


@dataclass(frozen=True)
class Alarm:
    """One finding of a window about one served version: fields for the code that acts on it
    (retraining, alerts), `text` for people."""

    model_version: str
    variant: str
    kind: AlarmKind
    detail: str  # the figures that decided it
    column: str | None = None  # the feature, for feature drift

    @property
    def family(self) -> Literal["drift", "decay"]:
        return "decay" if self.kind.endswith("decay") else "drift"

    @property
    def text(self) -> str:
        what = f"{self.kind} in {self.column}" if self.column else self.kind
        return f"v{self.model_version}/{self.variant}: {what} ({self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alarm:
        return cls(
            str(data["model_version"]), str(data["variant"]), data["kind"], str(data["detail"]), data.get("column")
        )


def alarm_texts(alarms: list[Alarm]) -> list[str]:
    return [a.text for a in alarms]
