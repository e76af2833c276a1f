"""Where maskdit keeps what it can rebuild or fetch again: one rule for every cache folder.

The folder of a kind of cache (`inception`, `classifiers`, `data`) is, in this order:
1. its own variable, when the kind has one and it is set (`MASKDIT_CLASSIFIER_CACHE`, `MASKDIT_DATA_CACHE`);
2. `$MASKDIT_CACHE/<kind>`;
3. the kind's default root when it has one (the shard cache: the node's RAM disk, /dev/shm), else
   `$XDG_CACHE_HOME/maskdit/<kind>`, else `~/.cache/maskdit/<kind>`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str, env: str | None = None, default: Path | None = None) -> Path:
    """The cache folder of `kind` by the rule above (not created here)."""
    if env and (own := os.environ.get(env)):
        return Path(own)
    if root := os.environ.get("MASKDIT_CACHE"):
        return Path(root) / kind
    if default is not None:
        return default
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maskdit" / kind
