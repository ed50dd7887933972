"""Writing a benchmark's JSON: this machine first (CPU model and ISA flags), then the payload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgead.core.machine import describe


def write_report(out: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``{"machine": describe(), **payload}`` to ``out`` (parents made), say so, return the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": describe(), **payload}, indent=1) + "\n")
    print(f"wrote {path}")
    return path
