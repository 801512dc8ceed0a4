"""The results file: one JSON object per line, appended by each sweep job (``benchmarks.sweep``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_rows", "append_row"]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results file (lines that are not JSON, e.g. cut by a kill, are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: str | Path, row: dict) -> None:
    """Append one row (a single write of one line, so concurrent readers never see half a row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
