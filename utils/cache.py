"""The per-user cache folder: records that only save time, rebuilt whenever absent or stale."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/continual-memorization` (default `~/.cache/continual-memorization`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "continual-memorization"


def trusted(path: Path) -> bool:
    """Whether a cached record may be read: this user's own file, writable by nobody else (records are written
    with mode 0600). Anything else is treated as absent and rebuilt."""
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022
