"""JSON-lines input files (documents for BrierLM, prompts for `calm generate --input`): one object per non-blank
line, each with a string field the caller names; anything else is a ValueError naming the file and the line."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path, field: str, what: str, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line, at most `limit` of them; `what` names them in the error for an
    empty file."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(records) == limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}: line {number} is not a JSON object with a string field '{field}'")
            records.append((number, record))
    if not records:
        raise ValueError(f"{path}: no {what}")
    return records
