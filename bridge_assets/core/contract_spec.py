"""A data set's contract as a file: its target, each feature's type and rules, the row id, the
time column, the slices the gates report, and what the data set is for.

A contract is TOML (`contracts/housing.toml` is bridge's default), checked by the pydantic models
below before anything runs: a bad file is a `ContractFileError` naming the file and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONTRACTS = Path(__file__).parent / "contracts"
HOUSING = CONTRACTS / "housing.toml"
RULE_TYPES = ("number", "integer", "category")


class ContractFileError(ValueError):
    """A contract file cannot be read or breaks the rules below."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumberRule(_Strict):
    """A finite number, bounded where the data set says so (`gt`: strictly above, `le`: at most)."""

    type: Literal["number"]
    gt: float | None = None
    ge: float | None = None
    le: float | None = None

    @model_validator(mode="after")
    def _one_lower_bound(self) -> Self:
        if self.gt is not None and self.ge is not None:
            raise ValueError("give gt or ge, not both")
        low = self.gt if self.gt is not None else self.ge
        if low is not None and self.le is not None and low >= self.le:
            raise ValueError(f"the lower bound {low:g} is not below le = {self.le:g}")
        return self


class IntegerRule(_Strict):
    """A whole number within [ge, le]: both bounds are required, the gates probe each."""

    type: Literal["integer"]
    ge: int
    le: int

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.ge > self.le:
            raise ValueError(f"ge = {self.ge} is above le = {self.le}")
        return self


class CategoryRule(_Strict):
    """One of `levels`; values are matched after stripping spaces and lower-casing, so the levels
    are written in that one spelling."""

    type: Literal["category"]
    levels: tuple[str, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _one_spelling(self) -> Self:
        odd = [level for level in self.levels if level != level.strip().lower() or not level]
        if odd:
            raise ValueError(f"levels must be lower-case without surrounding spaces: {odd}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError("levels repeat")
        return self


Rule = Annotated[NumberRule | IntegerRule | CategoryRule, Field(discriminator="type")]


class Corruption(_Strict):
    """A contract violation the simulator plants in some rows, to exercise quarantine: `value`
    in `column` (left out: the value goes missing)."""

    column: str
    value: str | int | float | None = None


class Simulation(_Strict):
    """How the simulator (`bridge simulate`, step 22) makes rows of this data set from its seed."""

    target_decimals: int = 0  # simulated targets are rounded to this many decimals (-3: thousands)
    corruptions: tuple[Corruption, ...] = ()  # default: one of each kind the rules allow


class TargetRule(NumberRule):
    """The column a model predicts: a number."""

    name: str = Field(min_length=1)


class ContractSpec(_Strict):
    """One data set's contract; a change to any rule is a new `version`."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    row_id: str = "row_id"
    seen_at: str = "seen_at"
    target: TargetRule
    features: dict[str, Rule] = Field(min_length=1)
    seed_columns: tuple[str, ...] = ()
    slices: tuple[str, ...] = ()
    intended_use: str = ""
    known_limits: tuple[str, ...] = ()
    example: dict[str, str | int | float] = Field(default_factory=dict)  # the API docs' request
    seed_data: str | None = None  # a CSV of real rows, relative to the contract file: the seed batch
    simulation: Simulation = Simulation()

    @model_validator(mode="after")
    def _columns_fit_together(self) -> Self:
        names = [self.row_id, self.seen_at, self.target.name, *self.features]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"a column is named twice (row id, time, target or feature): {repeated}")
        not_categories = [s for s in self.slices if not isinstance(self.features.get(s), CategoryRule)]
        if not_categories:
            raise ValueError(f"slices must name category features: {not_categories}")
        unknown = [name for name in self.example if name not in self.features]
        if unknown:
            raise ValueError(f"the example has columns that are not features: {unknown}")
        columns = {self.target.name, *self.features}
        stray = [c.column for c in self.simulation.corruptions if c.column not in columns]
        if stray:
            raise ValueError(f"simulation.corruptions name columns that are not the target or a feature: {stray}")
        if self.seed_columns:
            missing = [c for c in (self.target.name, *self.features) if c not in self.seed_columns]
            if missing:
                raise ValueError(f"seed_columns lacks {missing}")
        return self


def describe(spec: ContractSpec) -> list[str]:
    """The contract in a few lines, as `bridge contract` prints it."""
    lines = [
        f"contract {spec.name}, version {spec.version}: predicts {spec.target.name} ({_rule_text(spec.target)})",
        f"  row id {spec.row_id}; landing time {spec.seen_at}",
        *(f"  {name}: {_rule_text(rule)}" for name, rule in spec.features.items()),
    ]
    if spec.slices:
        lines.append(f"  slices the gates and the monitor report: {', '.join(spec.slices)}")
    return lines


def _rule_text(rule: NumberRule | IntegerRule | CategoryRule) -> str:
    if isinstance(rule, CategoryRule):
        return f"category, one of {' | '.join(rule.levels)}"
    if isinstance(rule, IntegerRule):
        return f"integer, {rule.ge} to {rule.le}"
    low = f"> {rule.gt:,.10g}" if rule.gt is not None else f">= {rule.ge:,.10g}" if rule.ge is not None else ""
    high = f"<= {rule.le:,.10g}" if rule.le is not None else ""
    bounds = " and ".join(bound for bound in (low, high) if bound)
    return f"number {bounds}" if bounds else "number"


def load_contract(path: Path) -> ContractSpec:
    """The contract in `path`; a `ContractFileError` naming the file and each field at fault."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ContractFileError(f"{path}: cannot be read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ContractFileError(f"{path}: not valid TOML ({error})") from None
    try:
        return ContractSpec.model_validate(data)
    except ValidationError as error:
        problems = [_problem(problem["loc"], problem["msg"]) for problem in error.errors(include_url=False)]
        raise ContractFileError(f"{path}: {'; '.join(problems)}") from None


def _problem(location: tuple[int | str, ...], message: str) -> str:
    """One problem led by its field as written in the file (`features.area.le`, without the rule
    type pydantic puts after a feature's name); a rule across fields names its fields itself."""
    message = message.removeprefix("Value error, ")
    parts = [str(part) for part in location]
    if len(parts) > 2 and parts[0] == "features" and parts[2] in RULE_TYPES:
        del parts[2]
    return f"{'.'.join(parts)}: {message}" if parts else message
