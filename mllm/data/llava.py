"""LLaVA-format JSON: reading it as chat Samples, converting it to shards, and writing it.

The format (LLaVA's instruction-tuning files, e.g. llava_v1_5_mix665k.json):

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

`image` is relative to an image root; a record without it is a text-only chat. Each `<image>`
token becomes an image part at its position in the turn (the text on either side becomes text
parts, stripped of surrounding whitespace such as the customary newline after the token); `human`
-> user, `gpt` -> assistant (`system`, `user` and `assistant` are accepted as well). A record has
at most one image, so it must have exactly one `<image>` token when it has an image and none
otherwise. Records that break these rules, or whose image is missing or unreadable, are skipped
and counted in a `DataStats`:

    malformed_record       not an object, or `image` is not a single path string
    malformed_conversation `conversations` missing or empty, a turn without from/value, an empty turn
    image_token_mismatch   the number of `<image>` tokens differs from the number of images
    missing_image          the image file does not exist or cannot be read
    image_outside_root     the image path leads outside the image root (absolute, `..`, or through a
                           symlink; checked after resolving symlinks), so it is never read
    not_regular_file       the image path is a FIFO, device, socket or folder (never read: a FIFO would
                           block the reader forever)
    corrupt_image / image_too_large   as for shards (`mllm.data.shards.decode_image`)

The whole JSON file is loaded at once (as LLaVA's own loader does); a file that is not a JSON
list raises LlavaFormatError instead of being skipped record by record.

`write_llava` writes Samples back in this format, one record per Sample, so a Sample can hold at
most one image; an image in an assistant turn is written as `<image>` in the `gpt` turn, which
`read_llava` and `convert_llava` read back as an image to draw. For the shapes world (`mllm data
shapes --format llava`) each scene becomes one multi-turn chat (`caption_qa_chat`: the caption
turn, then every QA pair); drawing prompts are left out because a LLaVA record has one image and
LLaVA-format tools expect it as input.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mllm.data.samples import Sample, chat_sample, messages_to_json, text_part
from mllm.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    DataStats,
    EncodedImage,
    SkipSample,
    decode_image,
    write_shards,
)
from mllm.io import write_file

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLAVA_JSON_NAME = "llava.json"
_ROLE_FROM_SPEAKER = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_SPEAKER_FROM_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


class LlavaFormatError(ValueError):
    """The file as a whole is not LLaVA JSON (not JSON, or not a list): nothing in it can be read."""


@dataclass
class _LlavaRecord:
    key: str  # unique and safe as a shard key / file name (see record_key)
    id: Any  # the record's own id, kept as it was
    messages: list[dict[str, Any]]  # JSON form: image parts are {"type": "image"} placeholders
    image_data: bytes | None
    image_ext: str | None
    image: Image.Image | None


def record_key(index: int, record_id: Any) -> str:
    """`{index:09d}_{id}` with the id reduced to shard-key characters.

    The position makes the key unique (LLaVA ids repeat across merged files, and ids with dots or
    slashes are not valid webdataset keys) while the id keeps it recognisable.
    """
    safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", "" if record_id is None else str(record_id))[:64]
    return f"{index:09d}_{safe_id}" if safe_id else f"{index:09d}"


def conversation_to_messages(conversations: Any) -> list[dict[str, Any]]:
    """LLaVA `conversations` -> messages in JSON form; raises SkipSample("malformed_conversation")."""
    if not isinstance(conversations, list) or not conversations:
        raise SkipSample("malformed_conversation", "conversations must be a non-empty list")
    messages = []
    for turn in conversations:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("from"), str)
            and turn["from"] in _ROLE_FROM_SPEAKER
            and isinstance(turn.get("value"), str)
        ):
            raise SkipSample("malformed_conversation", f"bad turn {turn!r}"[:200])
        parts: list[dict[str, Any]] = []
        for position, segment in enumerate(turn["value"].split(IMAGE_TOKEN)):
            if position > 0:
                parts.append({"type": "image"})
            if segment.strip():
                parts.append(text_part(segment.strip()))
        if not parts:
            raise SkipSample("malformed_conversation", f"empty {turn['from']} turn")
        messages.append({"role": _ROLE_FROM_SPEAKER[turn["from"]], "content": parts})
    return messages


def _load_llava(json_path: str | os.PathLike) -> list:
    """The records of a LLaVA JSON file; LlavaFormatError for a file that is not a JSON list."""
    with open(json_path, encoding="utf-8") as file:
        try:
            entries = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise LlavaFormatError(f"{json_path} is not valid JSON: {exn}") from exn
    if not isinstance(entries, list):
        raise LlavaFormatError(
            f"{json_path}: a LLaVA file is a JSON list of records, got {type(entries).__name__}"
        )
    return entries


def _iter_llava(
    json_path: str | os.PathLike | list, image_root: str | os.PathLike, stats: DataStats, max_image_pixels: int
) -> Iterator[_LlavaRecord]:
    """Valid records with their image read and decoded; everything else counted in `stats`. `json_path`
    may be the already loaded records."""
    entries = json_path if isinstance(json_path, list) else _load_llava(json_path)
    for index, entry in enumerate(entries):
        record_id = entry.get("id") if isinstance(entry, dict) else None
        try:
            record = _check_record(index, entry, Path(image_root), max_image_pixels)
        except SkipSample as skip:
            stats.skip(skip.reason, f"record {index} (id {record_id!r}): {skip.detail}"[:300])
            continue
        stats.records += 1
        yield record


def _check_record(index: int, entry: Any, image_root: Path, max_image_pixels: int) -> _LlavaRecord:
    if not isinstance(entry, dict):
        raise SkipSample("malformed_record", f"expected an object, got {type(entry).__name__}")
    image_path = entry.get("image")
    if image_path is not None and not (isinstance(image_path, str) and image_path):
        raise SkipSample("malformed_record", f"image must be one path string, got {image_path!r}"[:200])
    messages = conversation_to_messages(entry.get("conversations"))
    tokens = sum(part["type"] == "image" for message in messages for part in message["content"])
    if tokens != (0 if image_path is None else 1):
        raise SkipSample(
            "image_token_mismatch", f"{tokens} {IMAGE_TOKEN} tokens, {int(image_path is not None)} images"
        )
    data = ext = image = None
    if image_path is not None:
        data = read_image_file(image_root, image_path)
        image = decode_image(data, max_image_pixels)
        ext = os.path.splitext(image_path)[1][1:].lower()
    return _LlavaRecord(record_key(index, entry.get("id")), entry.get("id"), messages, data, ext, image)


def read_image_file(image_root: str | os.PathLike, image_path: str) -> bytes:
    """The bytes of `image_path` (relative to `image_root`), read only if it is a regular file inside the root.

    Raises SkipSample: "image_outside_root" for a path that, after resolving `..` and symlinks, lies outside
    the root (an absolute path, `../../secret.png`, a symlink out), "not_regular_file" for a FIFO, device,
    socket or folder (opened without blocking and checked before reading, so a FIFO never hangs the reader),
    "missing_image" for a file that does not exist or cannot be read.
    """
    root = os.path.realpath(image_root)
    try:
        resolved = os.path.realpath(os.path.join(root, image_path))
    except (OSError, ValueError) as exn:  # e.g. a NUL byte in the path
        raise SkipSample("malformed_record", f"image path {image_path!r}: {exn}"[:200]) from exn
    try:
        inside = os.path.commonpath([root, resolved]) == root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise SkipSample("image_outside_root", f"{image_path!r} resolves to {resolved}, outside {root}"[:300])
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(resolved, flags)
    except OSError as exn:
        reason = (
            "not_regular_file"
            if os.path.lexists(resolved) and not os.path.isfile(resolved)
            else "missing_image"
        )
        raise SkipSample(reason, f"{resolved}: {exn.strerror or exn}") from exn
    try:
        # Checked on the opened file, so nothing can be swapped in between the check and the read.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkipSample("not_regular_file", f"{resolved} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exn:
        raise SkipSample("missing_image", f"{resolved}: {exn.strerror or exn}") from exn
    finally:
        os.close(fd)


def read_llava(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    stats: DataStats | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Iterator[Sample]:
    """Chat Samples (task "chat") from a LLaVA JSON file; bad records are skipped and counted in `stats`.

    The summary is logged when the iteration ends, as for shards.
    """
    stats = DataStats() if stats is None else stats
    try:
        for record in _iter_llava(json_path, image_root, stats, max_image_pixels):
            images = [] if record.image is None else [record.image]
            stats.samples += 1
            yield chat_sample(record.key, record.messages, images)
    finally:
        if stats.total_skipped:
            logger.warning("llava %s: %s", json_path, stats.report())


def convert_llava(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    maxcount: int = 1000,
    stats: DataStats | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> list[str]:
    """LLaVA JSON + images -> shards in `out_dir`; returns the shard paths.

    Each record keeps its original image bytes and extension (`{key}.jpg`, `.png`, ...; other
    formats such as GIF or BMP are re-encoded as lossless PNG because the shard reader only knows
    IMAGE_EXTENSIONS) and gets a `{key}.json` with `id` and `messages` in JSON form, which
    `read_samples(..., tasks=("chat",))` reads back. Images are decoded once here, so a corrupt
    image is skipped at conversion instead of in every epoch. Skips are counted in `stats`.
    """
    stats = DataStats() if stats is None else stats
    entries = _load_llava(json_path)  # a file that is not LLaVA JSON fails before any shard is started

    def shard_records() -> Iterator[dict[str, Any]]:
        for record in _iter_llava(entries, image_root, stats, max_image_pixels):
            shard_record: dict[str, Any] = {"key": record.key, "id": record.id, "messages": record.messages}
            if record.image_ext in IMAGE_EXTENSIONS:
                shard_record["image"] = EncodedImage(record.image_data, record.image_ext)
            elif record.image is not None:
                shard_record["image"] = record.image
            yield shard_record

    shards = write_shards(shard_records(), out_dir, maxcount=maxcount, progress=progress, overwrite=overwrite)
    if stats.total_skipped:
        logger.warning("llava %s: %s", json_path, stats.report())
    return shards


def write_llava(samples: Iterable[Sample], out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write Samples as `{out_dir}/llava.json` + `{out_dir}/images/*.png`; return the JSON path.

    One record per Sample, images as lossless PNG; `image` paths are relative to `out_dir`, which
    is the `image_root` to read them back with. Consecutive text parts of one turn are joined by a
    newline, so they read back as one text part. Raises ValueError for a Sample with more than one
    image (a LLaVA record holds one).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, sample in enumerate(
        tqdm(samples, desc=f"writing {out}", unit=" records", disable=not progress)
    ):
        messages, images = messages_to_json(sample.messages)
        if len(images) > 1:
            raise ValueError(f"{sample.key}: a LLaVA record holds one image, this sample has {len(images)}")
        record: dict[str, Any] = {"id": sample.key}
        if images:
            relative_path = f"images/{record_key(index, sample.key)}.png"
            images[0].save(out / relative_path)
            record["image"] = relative_path
        record["conversations"] = [
            {
                "from": _SPEAKER_FROM_ROLE[message["role"]],
                "value": "\n".join(
                    IMAGE_TOKEN if part["type"] == "image" else part["text"] for part in message["content"]
                ),
            }
            for message in messages
        ]
        records.append(record)
    json_path = out / LLAVA_JSON_NAME
    write_file(json_path, json.dumps(records, indent=1) + "\n")  # last, atomically: it lists the images
    return json_path
