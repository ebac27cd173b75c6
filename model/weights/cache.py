"""Where the project keeps files it makes or fetches once: converted and downloaded weights, eval caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$SELAVPR_CACHE_DIR, else $XDG_CACHE_HOME/selavpr, else ~/.cache/selavpr."""
    if explicit := os.environ.get("SELAVPR_CACHE_DIR"):
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selavpr"
