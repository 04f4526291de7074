"""Files written whole or not at all: a run killed mid-write resumes from the last whole file, and trial workers
writing the same cache entry at once never read half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A name beside `path` (same suffix) to write to: it becomes `path` when the block ends without an error,
    and is removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    """`value` as JSON at `path`, written whole."""
    with written_whole(path) as partial:
        partial.write_text(json.dumps(value, indent=indent))
