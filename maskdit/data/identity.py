"""A dataset's identity: a sha256 of what went into it, computed from listings (no image is opened).

    digest = sha256(shard format version, source listing, resolution, VAE, encode options)

- the source listing: every image file's path under the input with its size and version (the
  S3 ETag, or a local file's mtime in ns), sorted, so the order of a listing does not matter;
  the bundled MNIST digits count as the digest of the file they come from;
- the VAE: hub id and revision, or a digest of a local directory's files (of an S3 directory's
  ETags); "pixel_space" without one;
- the options that change the shards (shard size, flips, grayscale, precision).

The encoder writes a dataset into `<store>/datasets/<base>-<digest[:12]>` and records the
identity in its manifest, so a changed image makes a new dataset and an unchanged source finds
the one it already made (maskdit.data.encode.fingerprint computes it; docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from maskdit.core.config import StrictModel


class DatasetId(StrictModel):
    """What identifies an encoded dataset, and a summary of the listing it was computed from."""

    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of what went in (module doc)")
    name: str = Field(description="<base>-<digest[:12]>: the dataset's folder under <store>/datasets")
    files: int = Field(ge=0, description="image files listed in the source")
    bytes: int = Field(ge=0, description="their total size")


def file_digest(path: Path) -> str:
    """sha256 of a local file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def listing_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """sha256 of (relative path, size, version) entries, in any order."""
    lines = sorted(f"{relative}\t{size}\t{version}" for relative, size, version in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dataset_digest(source: dict, resolution: int, vae: str, options: dict, format_version: int) -> str:
    """sha256 of the canonical JSON of what goes into a dataset (every argument is plain data)."""
    what = {"format_version": format_version, "source": source, "resolution": resolution, "vae": vae,
            "options": options}
    return hashlib.sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_name(base: str, digest: str) -> str:
    """`<base>-<digest[:12]>`, the base cut to characters that are safe in any object key."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "dataset"
    return f"{base}-{digest[:12]}"
