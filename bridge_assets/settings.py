"""One declaration per setting: its environment variable, type, default and description, on a
pydantic model per concern (lake, MLflow, training, monitoring, promotion, serving, cadences,
the stack). Dagster-free.

`from_env(env)` reads a mapping the caller passes — the code location's environment through
`build_defs(env)`, a test's dict — never the process environment at import; a bad value is a
`ValueError` naming the variable. `variables()` lists what a class reads, for the README's
configuration table and the test that holds the table to the classes.

pydantic-settings' `BaseSettings` reads `os.environ` (or a dotenv file) when a model is built,
and takes no mapping: that would make every constructor call depend on the process environment.
These are plain pydantic models instead, whose validation alias is the variable's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

DERIVED: dict[str, Any] = {"derived": True}  # a field's `json_schema_extra`: its default comes from other settings


@dataclass(frozen=True)
class Variable:
    """One environment variable a settings class reads (and the ones read in its place when it
    is unset); a derived default is computed from other settings by `derive`."""

    name: str
    field: str
    default: Any
    description: str
    alternatives: tuple[str, ...] = ()
    derived: bool = False


class EnvSettings(BaseModel):
    """Settings read from environment variables; fields are built by name in code and tests,
    by variable in `from_env`."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, extra="forbid")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        """The settings `env` holds, defaults for the rest; a set but empty variable counts as unset."""
        values: dict[str, str] = {}
        for variable in cls.variables():
            found = next((n for n in (variable.name, *variable.alternatives) if (env.get(n) or "").strip()), None)
            if found is not None:
                values[variable.name] = env[found].strip()
        values = cls.derive(values, env)
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            secret = {v.name for v in cls.variables() if not cls.model_fields[v.field].repr}
            raise ValueError(describe(error, {k: v for k, v in values.items() if k not in secret})) from None

    @classmethod
    def derive(cls, values: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
        """Fill defaults that depend on other settings (by variable name); none by default."""
        return values

    def to_env(self) -> dict[str, str]:
        """The variables that rebuild these settings in another process (a Dagster run, a
        replica); unset ones are left out. For settings of scalar values."""
        return {
            variable.name: _as_text(getattr(self, variable.field))
            for variable in self.variables()
            if getattr(self, variable.field) is not None
        }

    @classmethod
    def variables(cls) -> list[Variable]:
        """Every variable this class reads, in declaration order."""
        found = []
        for name, info in cls.model_fields.items():
            names = _names(info.validation_alias)
            if not names:
                continue
            default = info.get_default(call_default_factory=True)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            found.append(
                Variable(
                    names[0],
                    name,
                    None if default is PydanticUndefined else default,
                    info.description or "",
                    tuple(names[1:]),
                    bool(extra.get("derived")),
                )
            )
        return found


def comma_separated(value: Any) -> Any:
    """`alice, bob,` → ("alice", "bob"): a list variable's text as a tuple (a tuple passes)."""
    return tuple(name.strip() for name in value.split(",") if name.strip()) if isinstance(value, str) else value


def _names(alias: object) -> list[str]:
    """A field's variable and its alternatives: a plain alias, or the names of `AliasChoices`."""
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return []


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def describe(error: ValidationError, values: Mapping[str, str]) -> str:
    """Each problem on one line, led by the variable at fault and the value it held (if in
    `values`: secrets are left out of it)."""
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")  # a rule across fields names its variables itself
        if not problem["loc"]:
            lines.append(message)
            continue
        where = str(problem["loc"][0])
        held = f" (got {values[where]!r})" if where in values else ""
        lines.append(f"{where}: {message}{held}")
    return "; ".join(lines)
