"""Where a benchmark's numbers go: ``<out>/<name>.json`` (everything) and ``<out>/<name>.md`` (the table)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> str:
    return f"{platform.platform()}, {os.cpu_count()} CPUs"


def write_results(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """Write both files and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
