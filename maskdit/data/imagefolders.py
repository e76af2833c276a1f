"""The input of `maskdit encode`: a folder or URI of class folders, listed into image files in order.

Classes are the sorted folder names; files are taken in sorted order. Only the listing is read
(sizes and versions for the dataset's identity): no image is opened here. A class is its folder's
name in Unicode NFC, so "café" typed on macOS (NFD) and on Linux (NFC) is one class; a file or
folder whose name is not valid UTF-8 is skipped with its reason, like a file that is no image.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from maskdit.core import storage
from maskdit.core.errors import UserError
from maskdit.data.images import IMAGE_EXTENSIONS
from maskdit.data.shards import Skipped


class EncodeError(UserError, ValueError):
    """The input or the options cannot make a dataset; the message says what to change."""


@dataclass(frozen=True)
class ImageFile:
    uri: str
    label: int
    relative: str  # "<class>/<name>", what the file-list digest and the manifest show
    size: int = 0  # bytes, from the listing
    version: str = ""  # S3 ETag or local mtime (ns), from the listing


def _utf8(name: str) -> bool:
    """Whether a listed name is valid UTF-8 (Python keeps undecodable bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """A name that may hold undecodable bytes, printable and JSON-safe (those bytes as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def discover(input_uri: str) -> tuple[list[str], list[ImageFile], list[Skipped]]:
    """(class names, image files in order, skipped entries) of a folder or URI of class folders."""
    root = str(input_uri).rstrip("/")
    if storage.is_s3(root):
        listed = {item.uri[len(root) + 1 :]: item for item in storage.list_objects(root)}
        folders: set[str] = set()
    else:
        base = storage.local_path(root)
        if not base.is_dir():
            raise EncodeError(f"input {root!r} is not a folder; pass a folder (or s3:// prefix) of class folders")
        listed = {Path(item.uri).relative_to(base).as_posix(): item for item in storage.list_objects(base)}
        folders = {unicodedata.normalize("NFC", p.name) for p in base.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and _utf8(p.name)}
    skipped: list[Skipped] = []
    by_class: dict[str, list[tuple[str, str]]] = {name: [] for name in folders}
    for relative, uri in sorted((relative, item.uri) for relative, item in listed.items()):
        parts = PurePosixPath(relative).parts
        if not _utf8(relative):
            skipped.append(Skipped(path=_shown(uri), reason="its name is not valid UTF-8: rename it (e.g. "
                                   "convmv -f latin1 -t utf8) to include it"))
        elif any(part.startswith(".") for part in parts):
            skipped.append(Skipped(path=uri, reason="hidden file"))
        elif len(parts) < 2:
            skipped.append(Skipped(path=uri, reason="not inside a class folder"))
        elif PurePosixPath(relative).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(Skipped(path=uri, reason=f"not an image file (extension {PurePosixPath(relative).suffix!r}; "
                                                    f"expected one of {sorted(IMAGE_EXTENSIONS)})"))
        else:
            by_class.setdefault(unicodedata.normalize("NFC", parts[0]), []).append((relative, uri))
    for name in sorted(by_class):
        if not by_class[name]:
            skipped.append(Skipped(path=storage.join(root, name), reason="empty class folder: no images, not a class"))
            del by_class[name]
    class_names = sorted(by_class)
    if not class_names:
        raise EncodeError(f"no images under {root}: expected one folder per class holding "
                          f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files")
    if len(class_names) == 1:
        raise EncodeError(f"only one class ({class_names[0]!r}) under {root}: a class-conditional model needs "
                          "at least two class folders")
    files = [ImageFile(uri=uri, label=label, relative=relative, size=listed[relative].size,
                       version=listed[relative].version)
             for label, name in enumerate(class_names) for relative, uri in by_class[name]]
    return class_names, files, skipped
