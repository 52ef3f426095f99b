"""The per-user cache folder: records that only save time, rebuilt whenever absent or stale."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/continual-memorization` (default `~/.cache/continual-memorization`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "continual-memorization"
