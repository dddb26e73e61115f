"""The README stays true: every variable the code reads is in its configuration table, and
every document it links exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for folder in ("bridge_assets", "serving", "deploy") for p in (ROOT / folder).rglob("*.py")]


def test_every_bridge_variable_the_code_reads_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    used = {name for path in CODE for name in re.findall(r"[\"'](BRIDGE_[A-Z0-9_]+)[\"']", path.read_text())}
    assert used, "no variables found: the scan is broken"
    missing = sorted(name for name in used if f"`{name}`" not in table)
    assert missing == [], f"variables read by the code but not in the README's configuration table: {missing}"


def test_every_linked_document_exists():
    readme = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme))
    assert links, "no links found: the scan is broken"
    assert sorted(link for link in links if not (ROOT / link).is_file()) == []
