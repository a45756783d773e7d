"""A plain folder of images as a data source, next to webdataset shards.

    photos/                      every .jpg / .jpeg / .png / .webp (any case) in the folder and its
      holiday/IMG_0001.JPG       subfolders, in sorted path order; hidden files and folders (names
      cat.png                    starting with a dot, e.g. macOS `._IMG_0001.JPG`) are ignored

`--data` of `mllm train-tokenizer`, `mllm eval-tokenizer` and `mllm pretokenize` takes such a folder as well
as shards: a folder is read as images when no `*.tar` shard lies directly in it (`is_image_folder`).
Every file is decoded by the project's one decoder (`tokenizer_vision.load_image`: size limits, bomb and
truncation checks, EXIF orientation, RGB). A file that does not decode is skipped and counted as
`corrupt_image` (`image_too_large` above the pixel limit), never a crash; one warning line at the end names
the count and the first few files. A folder without any image is a `ValueError` naming the folder and the
accepted extensions.

Records have the form the shard reader yields, `{"key", "image", "json"}`: the key is the file's relative
path made safe for a shard member name (`sub/IMG_0001_JPG`), and the JSON holds only `{"path": relative
path}`, so `mllm pretokenize` of a folder writes image-only records (codes, no caption).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mllm.data.shards import MAX_IMAGE_PIXELS, DataStats
from tokenizer_vision.image_processing import ImageError, load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ACCEPTED = "/".join(IMAGE_SUFFIXES)
SHOWN_NAMES = 3  # unreadable files named in the warning line
_UNSAFE_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_/-]")


def is_image_folder(path: str | os.PathLike) -> bool:
    """True for a directory with no `*.tar` shard directly inside: it is read as a folder of images."""
    path = Path(path)
    return path.is_dir() and not any(child.suffix == ".tar" and child.is_file() for child in path.iterdir())


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder` (recursively, by extension, any case), sorted by relative path.

    A missing folder is a `FileNotFoundError`; a folder without any image a `ValueError` naming the folder
    and the accepted extensions.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"data {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"data {folder} is not a folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(root, name) for name in files
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    if not found:
        raise ValueError(
            f"data folder {folder} holds no images (accepted: {ACCEPTED} files, any case, in the folder or its "
            "subfolders; or pass a folder of *.tar shards)"
        )
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def record_key(relative: str, taken: set[str]) -> str:
    """A shard member key for a relative path: letters, digits, `_`, `-` and `/` only (dots and other
    characters become `_`, so `a.jpg` and `a.png` stay apart), starting with a letter or digit, unique
    among `taken` (which it joins)."""
    key = _UNSAFE_KEY_CHARACTERS.sub("_", relative)
    key = "/".join(part if part[:1].isalnum() else "i" + part for part in key.split("/"))
    unique, number = key, 1
    while unique in taken:
        number += 1
        unique = f"{key}-{number}"
    taken.add(unique)
    return unique


def read_image_folder(
    folder: str | os.PathLike, stats: DataStats | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[dict[str, Any]]:
    """Records `{"key", "image": RGB PIL image, "json": {"path": relative path}}` of every image under
    `folder`, in sorted order. Files that do not decode are skipped and counted in `stats`; when the
    iteration ends (or stops early), one warning line gives the count and the first few names."""
    folder = Path(folder)
    files = list_images(folder)
    stats = DataStats() if stats is None else stats
    taken: set[str] = set()
    unreadable: list[str] = []
    try:
        for path in files:
            relative = path.relative_to(folder).as_posix()
            try:
                image = load_image(path, max_pixels)
            except ImageError as exn:
                stats.skip("image_too_large" if exn.reason == "too_large" else "corrupt_image", f"{relative}: {exn}")
                unreadable.append(relative)
                continue
            except OSError as exn:  # unreadable file (permissions, vanished meanwhile)
                stats.skip("corrupt_image", f"{relative}: {exn}")
                unreadable.append(relative)
                continue
            stats.records += 1
            yield {"key": record_key(relative, taken), "image": image, "json": {"path": relative}}
    finally:
        if unreadable:
            logger.warning("%s", unreadable_summary(folder, unreadable))


def unreadable_summary(folder: str | os.PathLike, names: list[str]) -> str:
    """`skipped 3 unreadable image files in photos/: a.jpg, b.png, c.webp` (the first few, then `...`)."""
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    plural = "s" if len(names) != 1 else ""
    return f"skipped {len(names)} unreadable image file{plural} in {folder}: {shown}"


__all__ = ["ACCEPTED", "IMAGE_SUFFIXES", "is_image_folder", "list_images", "read_image_folder", "record_key",
           "unreadable_summary"]
