"""Write the generated tables into README.md (`make docs`), or with --check fail when they are stale.

A table sits between `<!-- begin NAME -->` and `<!-- end NAME -->` markers; today: `configuration`,
made from the Settings fields.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from chatsession_server.settings import configuration_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES: dict[str, Callable[[], str]] = {"configuration": configuration_table}


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
