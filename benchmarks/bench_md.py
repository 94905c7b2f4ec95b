"""Write one benchmark script's section of BENCHMARKS.md, leaving the other scripts' sections alone.

Each script owns the text between ``<!-- KEY:start -->`` and ``<!-- KEY:end -->``; a re-run
replaces its own section only, so every figure in the file comes from the script that names it.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
_HEADER = "# Benchmarks\n\nEvery figure below is written by a script in `benchmarks/` from its own run.\n"


def markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def update_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) section ``key`` of the markdown file ``path`` with ``body``, atomically."""
    start, end = markers(key)
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
