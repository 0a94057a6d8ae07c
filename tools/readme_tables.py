"""Write the generated tables into README.md (`make docs`), or with --check fail when they are stale.

A table sits between `<!-- begin NAME -->` and `<!-- end NAME -->` markers: `configuration`, made
from the Settings fields, and `benchmarks`, made from the committed bench/results.json (so the README
shows the figures of the last `make bench` that was committed, never hand-copied ones).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from chatsession_server.settings import configuration_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results.json"


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def benchmarks_table() -> str:
    """Every row of bench/results.json: figure, in-run baseline, ratio, target and whether it is met."""
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    machine = results["machine"]
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    lines = [
        f"Run of {results['date']} on {machine['cores']} cores ({machine['cpu']}), load average at the"
        f" start {load}; {results['placement']}. {results.get('note', '')}".rstrip(),
        "",
        "| figure | value | baseline (same run) | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        unit = row["unit"]
        met = {True: "yes", False: "**no**", None: ""}[row.get("met")]
        baseline = f"{row['baseline_name']}: {_figure(row['baseline'])} {unit}" if row.get("baseline") else ""
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else ""
        lines.append(
            f"| {row['name']} | {_figure(row['value'])} {unit} | {baseline} | {ratio} "
            f"| {row.get('target') or ''} | {met} |"
        )
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {"configuration": configuration_table, "benchmarks": benchmarks_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- begin {name} -->\n).*?(<!-- end {name} -->)", re.DOTALL)
        found = pattern.search(text)
        if not found:
            raise SystemExit(f"README.md has no <!-- begin {name} --> ... <!-- end {name} --> markers")
        text = text[: found.end(1)] + make() + text[found.start(2) :]
    return text


def main() -> int:
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in sys.argv[1:]:
        if wanted != current:
            print("README.md's generated tables are stale: run 'make docs'", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
