"""Every benchmark the README cites, at the README's sizes, one after another (`make bench`).

Each script's output streams as it runs; at the end, the lines that carry each one's ratios and
goals are printed again together, so the figures the README quotes are the last thing on the
screen. Exits non-zero if any bench did (a goal missed, a failed run), after running them all.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    script: str
    arguments: tuple[str, ...]
    summary: str  # regex: the lines that carry the bench's ratios and goals

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH / self.script), *self.arguments]


BENCHES = (
    Bench("features.py", ("--rows", "2000000"), r"ratio \("),
    Bench("train.py", ("--rows", "300000"), r"speed ratio|x per epoch\)"),
    Bench("quality.py", (), r"mean CV R²"),
    Bench("simulate.py", ("--rows", "10000000"), r"rows/s"),
    Bench("drift.py", (), r"^detection|^false alarms|speed-up"),
    Bench("recovery.py", (), r"^\([a-d]\) N="),
    Bench("serve_load.py", (), r"\(goal"),
    Bench("sizing.py", ("--rows", "1000000"), r"rows per CPU-second"),
)


def run(bench: Bench) -> tuple[int, list[str], float]:
    """Run one bench, echoing its output; its exit code, summary lines and wall time."""
    print(f"\n=== python bench/{bench.script} {' '.join(bench.arguments)}", flush=True)
    started = time.monotonic()
    summary = []
    with subprocess.Popen(bench.command(), stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            if re.search(bench.summary, line):
                summary.append(line.rstrip())
    return process.returncode, summary, time.monotonic() - started


def main() -> int:
    results = [(bench, *run(bench)) for bench in BENCHES]
    print("\n=== the figures, as each bench printed them")
    for bench, code, summary, seconds in results:
        status = "" if code == 0 else f"  EXIT {code}"
        print(f"python bench/{bench.script} {' '.join(bench.arguments)} ({seconds:.0f} s){status}")
        for line in summary or ["(no summary line: see its output above)"]:
            print(f"    {line}")
    return max(code for _, code, _, _ in results)


if __name__ == "__main__":
    sys.exit(main())
