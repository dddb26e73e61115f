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


# A measured figure: a rate, a memory size, or a ratio such as "8.2x" / "13.7x".
FIGURE = re.compile(r"\d[\d,.]*\s?(?:k |M |)(?:req/s|rows/s|MiB|GiB)|\b\d+(?:\.\d+)?x\b")
COMMAND = re.compile(r"(?:bench|deploy)/\w+\.py|make (?:demo|bench|test)\b")


def _blocks(text: str) -> list[str]:
    """Paragraphs, with a table kept together with the paragraph that introduces it; table rows
    of settings (they name a `BRIDGE_` variable: a default is no measurement) left out."""
    text = "\n".join(line for line in text.splitlines() if not (line.startswith("|") and "`BRIDGE_" in line))
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith("|") and blocks:
            blocks[-1] += "\n" + block
        else:
            blocks.append(block)
    return blocks


def test_every_benchmark_figure_names_the_command_that_prints_it():
    """A throughput, memory or speed-up figure in the README or docs sits beside the command
    that measures it (a bench script, or make demo/bench/test), so anyone can run it again."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    unbacked = [
        f"{path.name}: {FIGURE.search(block).group(0)!r} in {block.strip()[:90]!r}"
        for path in documents
        for block in _blocks(path.read_text())
        if FIGURE.search(block) and not COMMAND.search(block)
    ]
    assert sum(bool(FIGURE.search(b)) for p in documents for b in _blocks(p.read_text())) >= 8, "no figures found: the scan is broken"
    assert unbacked == [], "figures without the command that prints them:\n" + "\n".join(unbacked)
