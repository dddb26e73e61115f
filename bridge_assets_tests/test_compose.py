"""The container deployment (Dockerfile, deploy/compose.yaml, deploy/dagster.yaml) against what
runs here: every variable it sets is documented, every part of the stack has its service.

No Docker engine runs on the build machines, so these read the files; the parts themselves run
for real in test_stack.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deploy.stack import COMPOSE_COUNTERPARTS

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]{2,})`")


def documented_variables() -> set[str]:
    """Names in the README's tables (its configuration table among them) and in docs/production.md."""
    readme_tables = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|"))
    return set(VARIABLE.findall(readme_tables)) | set(VARIABLE.findall((ROOT / "docs" / "production.md").read_text()))


def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def compose_variables() -> set[str]:
    """Variables the services get, and those compose reads from its --env-file (`${NAME}`)."""
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "deploy" / "compose.yaml").read_text()))
    for service in compose()["services"].values():
        environment = service.get("environment") or {}
        names |= set(environment) if isinstance(environment, dict) else {item.split("=", 1)[0] for item in environment}
    return names


def test_every_variable_compose_sets_is_documented() -> None:
    undocumented = sorted(compose_variables() - documented_variables())
    assert undocumented == [], f"compose sets variables no documentation names: {undocumented}"


def test_every_variable_the_dagster_instance_reads_is_set_by_compose() -> None:
    instance = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    read = set(re.findall(r"\{env: ([A-Z_]+)\}", (ROOT / "deploy" / "dagster.yaml").read_text()))
    passed = set(instance["run_launcher"]["config"]["env_vars"])
    daemon = set(compose()["services"]["dagster-daemon"]["environment"])
    assert read and read <= daemon and passed <= daemon, sorted((read | passed) - daemon)
    assert instance["run_launcher"]["class"] == "DockerRunLauncher"
    assert instance["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"


def test_every_part_of_the_stack_has_its_compose_service() -> None:
    services = set(compose()["services"])
    missing = {part: [s for s in wanted if s not in services] for part, wanted in COMPOSE_COUNTERPARTS.items()}
    assert {part: s for part, s in missing.items() if s} == {}
    workspace = yaml.safe_load((ROOT / "deploy" / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["host"] == "dagster-code"


def test_the_image_is_pinned_by_the_constraints_and_cpu_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    assert "bridge_assets.definitions" in dockerfile
