"""Paths as users type them."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with `~` and `~user` expanded. os.path.expanduser leaves an unknown `~user` as it is, so the caller
    gives its plain not-found error; Path.expanduser would raise RuntimeError instead."""
    return Path(os.path.expanduser(path))
