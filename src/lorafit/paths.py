"""Paths as users type them, and where lorafit caches converted models, tokenizers and datasets."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with `~` and `~user` expanded. os.path.expanduser leaves an unknown `~user` as it is, so the caller
    gives its plain not-found error; Path.expanduser would raise RuntimeError instead."""
    return Path(os.path.expanduser(path))


def cache_dir() -> Path:
    """LORAFIT_CACHE, else ~/.cache/lorafit: converted embedded models, built tokenizers, datasets."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def data_cache_dir() -> str:
    """Arrow files of read/tokenized/packed data: LORAFIT_DATA_CACHE, else <lorafit cache>/datasets."""
    path = Path(os.environ["LORAFIT_DATA_CACHE"]) if os.environ.get("LORAFIT_DATA_CACHE") else cache_dir() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
