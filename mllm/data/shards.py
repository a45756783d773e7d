"""Webdataset shards: writing them, and reading pipelines that skip and count bad data.

Shard layout: one record per key, `{key}.png` (or `.jpg`, `.jpeg`, `.webp`:
the encoded image) and `{key}.json` (every other field: `caption`, `qa`, `prompt`, `messages`
in JSON form, `scene`, ...). A record may have no image (a text-only chat). `write_shards` also
writes `index.json` listing every shard and its record count.

A record of several images (an edit: source and target; a question over two images) stores the first as
above and the k-th further one as `{key}.img{k}.png` (k = 1, 2, ...); readers yield them all, in order, as
`"images"`, and the first also as `"image"`.

Pre-tokenized shards (`mllm pretokenize`) carry `{key}.codes.npy` (the image's code grid (h, w),
an integer .npy) in place of the image (`{key}.img{k}.codes.npy` for further images). Readers then yield
`"codes"` (LongTensor (h, w); every image's in `"codes_list"`) with `"image": None`, and samples get `{"type": "image", "codes": ...}` parts, which the processor
takes as they are: training on such shards never runs the vision tokenizer.

Reading is a `webdataset.DataPipeline` (a torch `IterableDataset`):

    shard list -> wds.split_by_node -> wds.split_by_worker -> tar reading (wds.tarfile_samples)
      -> decode + checks -> [expand records into Samples] -> [shuffle] -> report at the end

Splitting is webdataset's own: `split_by_node` gives each distributed rank (RANK/WORLD_SIZE or an
initialised torch.distributed) every world_size-th shard, and `split_by_worker` gives each torch
DataLoader worker every num_workers-th shard of those, so every record is read exactly once per
epoch with any `num_workers`. Shards are the unit of splitting: use at least as many shards as
ranks x workers, or some workers sit idle.

Bad data never stops a run. Every skipped item is counted in a `DataStats` by reason, and the
summary is logged (logging.warning) when an iteration ends:

    unreadable_shard   a shard that cannot be opened                      (counted once per shard)
    corrupt_tar        a truncated or otherwise unreadable tar stream     (counted once per shard)
    duplicate_member   a key with two members of the same extension       (counted once per shard)
    bad_member_name    a member not named `{key}.{extension}` with a key `write_shards` accepts: no
                       extension, `..` or an absolute path, odd characters (counted per member)
    non_regular_member a symlink, hard link, device or FIFO member (never followed; counted per member)
    incomplete_record  the record being read when a shard broke off: it may lack members
    missing_json       a record without its .json
    invalid_json       .json that does not parse, or is not an object
    corrupt_image      an image that does not decode (truncated, corrupt, not an image)
    corrupt_codes      a codes.npy that does not load (never unpickled) or is not a 2-D integer grid
    image_too_large    an image above `max_image_pixels` (refused before decoding)
    missing_fields     JSON with none of caption / qa / prompt / messages / edit / multi_qa
    malformed_field    one of those fields with the wrong shape (counted per field or qa entry)
    missing_image      an image task (caption / vqa / t2i) on a record without an image, or an edit or a
                       multi-image question on a record with fewer than two

With DataLoader workers each worker process counts into its own copy of the `DataStats` and logs
its own summary; the copy in the main process stays empty.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mllm.data.samples import (
    TASKS,
    Sample,
    caption_sample,
    chat_sample,
    edit_sample,
    multi_image_sample,
    t2i_sample,
    vqa_sample,
)
from mllm.io import TMP_SUFFIX, aside, fsync_path, fsync_tree, write_file
from tokenizer_vision.image_processing import ImageError, load_image

logger = logging.getLogger(__name__)

# Refuse images above this many pixels before decoding them: a 64-megapixel RGB image is already
# 192 MB in memory, and anything bigger in a training set is far more likely an error (or a
# decompression bomb) than data.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TASK_FIELDS = ("caption", "qa", "prompt", "messages", "edit", "multi_qa")
# Further images of a record: `{key}.img1.png`, `{key}.img2.png`, ... (and `img1.codes.npy` once pre-tokenized).
MAX_RECORD_IMAGES = 16
CODES_EXTENSION = "codes.npy"  # the member `{key}.codes.npy` of a pre-tokenized record

# Webdataset splits a member name into key and extension at the first dot of its base name and
# treats `__name__` members as metadata, so keys we write must avoid both.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_/-]*")
_EXTENSION_PATTERN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, which it skips


class SkipSample(Exception):
    """Raised by a check to drop the item at hand; `reason` is the DataStats counter it lands in."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DataStats:
    """What a reader kept and what it skipped, by reason (see the module docstring for the reasons)."""

    records: int = 0
    samples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # The first offending item of each reason, so a report points at something to look at.
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)
        logger.debug("skipped (%s) %s", reason, detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        kept = f"{self.records} records" + (f", {self.samples} samples" if self.samples else "")
        if not self.skipped:
            return f"read {kept}; nothing skipped"
        reasons = "; ".join(
            f"{reason}={count}" + (f" (first: {self.examples[reason]})" if self.examples.get(reason) else "")
            for reason, count in sorted(self.skipped.items())
        )
        return f"read {kept}; skipped {self.total_skipped}: {reasons}"


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes written to a shard as they are (e.g. a source JPEG, kept without re-encoding)."""

    data: bytes
    ext: str  # one of IMAGE_EXTENSIONS: the member is written as {key}.{ext}


# ---------------------------------------------------------------------------------------------
# Writing


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    maxcount: int = 1000,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write records to `{out_dir}/{prefix}-%06d.tar` with webdataset's ShardWriter; return the shard paths.

    Each input dict needs a `key` (letters, digits, `_`, `-`, `/`; no dots) and may have an
    `image`: a PIL image (stored as lossless PNG) or an `EncodedImage` (stored as is), or `images`: a list
    of them (the first stored as the image, the k-th further one as `{key}.img{k}.png`), or `codes`:
    an integer numpy array (h, w), stored as `{key}.codes.npy`, or a list of them (one per image, further
    ones as `{key}.img{k}.codes.npy`). Every other
    field goes into `{key}.json`, so it must be JSON-serialisable; chat `messages` must already be
    in JSON form (see `mllm.data.samples`). Also writes `{out_dir}/index.json` with each shard's
    record count. Existing shards with the same prefix are an error unless `overwrite`, because a
    reader given the directory would otherwise mix them with the new ones.

    Nothing partial is left behind: shards are written to a hidden staging folder in `out_dir`, fsynced,
    and moved into place (replacing the existing ones) only once every record is written; on an error
    the staging folder is removed and `out_dir` keeps what it held. `index.json` is written last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(glob.escape(prefix) + "-" + "[0-9]" * 6 + ".tar"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} '{prefix}-*.tar' shards (e.g. {existing[0].name})"
        )
    # Shards are written to a hidden staging folder, fsynced, and moved into `out` only once every record is
    # written: an error (or a kill) midway never leaves a partial shard under a shard's name, and shards being
    # replaced stay until the new ones are complete.
    staging = aside(out / prefix, TMP_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir()
    try:
        # ShardWriter fills the pattern with `%`, so a literal `%` in the path must be doubled.
        pattern = str(staging / f"{prefix}-").replace("%", "%%") + "%06d.tar"
        # A fixed member mtime makes the shards byte-for-byte reproducible: same data, same checksum.
        with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=0) as writer:
            counts = {writer.fname: 0}  # ShardWriter opens the first shard at once, even for no records
            for sample in tqdm(samples, desc=f"writing {out}", unit=" records", disable=not progress):
                writer.write(_tar_record(sample))
                counts[writer.fname] = counts.get(writer.fname, 0) + 1
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (out / "index.json").unlink(missing_ok=True)  # stale from here until the new one is written
    for path in existing:
        path.unlink()
    shards = []
    for path in counts:
        shards.append(str(out / os.path.basename(path)))
        os.replace(path, shards[-1])
    fsync_path(out)
    shutil.rmtree(staging)
    index = {
        "shards": [{"file": os.path.basename(path), "count": count} for path, count in counts.items()],
        "total": sum(counts.values()),
    }
    write_file(out / "index.json", json.dumps(index, indent=1) + "\n")
    return shards


def _tar_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Input dict -> the ShardWriter form {"__key__", image extension: image, "json": fields}."""
    key = sample.get("key")
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"record key must match {_KEY_PATTERN.pattern} (webdataset splits names at dots), got {key!r}"
        )
    record: dict[str, Any] = {"__key__": key}
    if "image" in sample and "images" in sample:
        raise ValueError(f"{key}: give `image` or `images`, not both")
    images = sample["images"] if "images" in sample else [sample.get("image")]
    if len(images) > MAX_RECORD_IMAGES:
        raise ValueError(f"{key}: at most {MAX_RECORD_IMAGES} images per record, got {len(images)}")
    for index, image in enumerate(images):
        prefix = f"img{index}." if index else ""
        if isinstance(image, EncodedImage):
            record[prefix + image.ext] = image.data
        elif isinstance(image, Image.Image):
            record[prefix + "png"] = image  # ShardWriter's default encoder saves PIL images by extension
        elif image is not None:
            raise TypeError(f"{key}: image must be a PIL image or EncodedImage, got {type(image).__name__}")
    codes = sample.get("codes")
    grids = codes if isinstance(codes, (list, tuple)) else [] if codes is None else [codes]
    if len(grids) > MAX_RECORD_IMAGES:
        raise ValueError(f"{key}: at most {MAX_RECORD_IMAGES} code grids per record, got {len(grids)}")
    for index, grid in enumerate(grids):
        if not isinstance(grid, np.ndarray) or grid.dtype.kind not in "iu" or grid.ndim != 2:
            raise TypeError(f"{key}: codes must be a 2-D integer numpy array, got {grid!r}"[:200])
        record[(f"img{index}." if index else "") + CODES_EXTENSION] = encode_codes(grid)
    record["json"] = {name: value for name, value in sample.items()
                      if name not in ("key", "image", "images", "codes")}
    return record


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A directory (its `*.tar`, sorted), a brace pattern or `::`-joined list, one path, or a list."""
    if isinstance(urls, (str, os.PathLike)):
        path = os.fspath(urls)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                hint = (" (LLaVA JSON: convert it first with `mllm data convert-llava`)"
                        if glob.glob(os.path.join(glob.escape(path), "*.json")) else "")
                raise FileNotFoundError(f"no *.tar shards in directory {path}{hint}")
            return found
        if os.path.isfile(path) and not tarfile.is_tarfile(path):
            # One file given, not a shard (an image, a JSON file): say so, instead of reading no records.
            raise ValueError(f"data {path} is not a shard (.tar) (give a folder of shards or a shard, e.g. from "
                             "`mllm data`)")
        return wds.shardlists.expand_urls(path)
    resolved = [os.fspath(url) for url in urls]
    if not resolved:
        raise ValueError("no shard urls given")
    return resolved


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image (`tokenizer_vision.load_image`: any format PIL reads, size checked
    from the header before decoding, PNG checksums checked, EXIF orientation applied, transparency
    composited over white); raises SkipSample("image_too_large" | "corrupt_image")."""
    try:
        return load_image(data, max_pixels)
    except ImageError as exn:
        reason = "image_too_large" if exn.reason == "too_large" else "corrupt_image"
        raise SkipSample(reason, str(exn)) from exn


def encode_codes(codes: np.ndarray) -> bytes:
    """A code grid -> .npy bytes (what `{key}.codes.npy` holds)."""
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    return buffer.getvalue()


def decode_codes(data: bytes) -> torch.Tensor:
    """`{key}.codes.npy` bytes -> LongTensor (h, w); raises SkipSample("corrupt_codes").

    allow_pickle=False: a shard is untrusted input, and unpickling it could run arbitrary code.
    """
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exn:  # what np.load raises for broken or object arrays
        raise SkipSample("corrupt_codes", repr(exn)) from exn
    if not isinstance(codes, np.ndarray):  # an .npz archive loads as an NpzFile
        raise SkipSample("corrupt_codes", f"expected one array, got {type(codes).__name__}")
    if codes.dtype.kind not in "iu" or codes.ndim != 2:
        raise SkipSample("corrupt_codes", f"expected a 2-D integer array, got {codes.dtype} {codes.shape}")
    return torch.from_numpy(codes.astype(np.int64))


def read_records(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle: int = 0,
    seed: int = 0,
    stats: DataStats | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    split: bool = True,
) -> wds.DataPipeline:
    """Records `{"key", "image": RGB PIL image or None, "images": [every image, in order], "json": dict}`
    from shards.

    A pre-tokenized record (`{key}.codes.npy`) also has `"codes"`: LongTensor (h, w), `"codes_list"` (every
    image's grid, in order), and `"image": None`, `"images": []`.

    `split=False` turns off the per-process / per-worker shard split (every caller reads all).

    `shuffle` > 0 shuffles the shard order (seeded, identical in every worker so the split
    stays disjoint) and records through a buffer of that size. The returned pipeline carries
    its counters as `.stats` (the `stats` passed in, or a new DataStats).
    """
    return _pipeline(urls, None, shuffle, seed, stats, max_image_pixels, split)


def read_samples(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    tasks: Sequence[str] = ("caption", "vqa", "t2i", "chat"),
    *,
    shuffle: int = 0,
    seed: int = 0,
    stats: DataStats | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> wds.DataPipeline:
    """`Sample`s of the given tasks from shards; each record expands as in `record_samples`.

    `shuffle` > 0 shuffles shards and then samples (so the samples of one record spread out)
    through a buffer of that size. Same seed, same order: pass `seed=base + epoch` to vary it.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    return _pipeline(urls, tuple(tasks), shuffle, seed, stats, max_image_pixels)


def record_samples(
    record: dict[str, Any], tasks: Sequence[str] = TASKS, stats: DataStats | None = None
) -> list[Sample]:
    """Expand one decoded record: `caption` -> caption sample, each `qa` entry -> vqa sample,
    `prompt` -> t2i sample (the record's image is the target), `messages` -> chat sample (bound to all the
    record's images), `edit` ({"instruction", ...}) -> edit sample (image 1 is the edit of image 0), each
    `multi_qa` entry -> a multi-image sample (every image, then the question).

    Sample keys are `{key}/caption`, `{key}/vqa{i}`, `{key}/t2i`, `{key}/chat`, `{key}/edit`, `{key}/multi{i}`. Malformed fields
    and image tasks without an image are skipped and counted in `stats`; the rest still expand.
    A record with `"codes"` gives image parts `{"type": "image", "codes": LongTensor (h, w)}`.
    """
    stats = DataStats() if stats is None else stats
    key, image, meta = record["key"], record["image"], record["json"]
    codes = record.get("codes")
    images = list(record.get("images", [] if image is None else [image]))
    if codes is not None:
        # The sample builders place whatever stands for the image; the codes parts replace it below.
        image = codes
        images = list(record.get("codes_list", [codes]))
    if not any(name in meta for name in TASK_FIELDS):
        stats.skip("missing_fields", f"{key}: has none of {TASK_FIELDS}")
        return []

    def usable_image(what: str) -> bool:
        if image is None:
            stats.skip("missing_image", f"{key}: {what} needs an image")
        return image is not None

    samples: list[Sample] = []
    if "caption" in tasks and "caption" in meta:
        caption = meta["caption"]
        if not isinstance(caption, str) or not caption:
            stats.skip("malformed_field", f"{key}: caption {caption!r}"[:200])
        elif usable_image("caption"):
            samples.append(caption_sample(f"{key}/caption", image, caption))
    if "vqa" in tasks and "qa" in meta:
        for index, pair in _qa_pairs(meta, "qa", key, stats):
            if usable_image("qa"):
                samples.append(vqa_sample(f"{key}/vqa{index}", image, pair["question"], pair["answer"]))
    if "t2i" in tasks and "prompt" in meta:
        prompt = meta["prompt"]
        if not _is_text(prompt):
            stats.skip("malformed_field", f"{key}: prompt {prompt!r}"[:200])
        elif usable_image("prompt"):
            samples.append(t2i_sample(f"{key}/t2i", prompt, image))
    if "chat" in tasks and "messages" in meta:
        try:
            samples.append(chat_sample(f"{key}/chat", meta["messages"], images))
        except ValueError as exn:
            stats.skip("malformed_field", f"{key}: messages: {exn}")

    def two_images(what: str) -> bool:
        if len(images) < 2:
            stats.skip("missing_image", f"{key}: {what} needs two images, the record has {len(images)}")
        return len(images) >= 2

    if "edit" in tasks and "edit" in meta:
        edit = meta["edit"]
        if not (isinstance(edit, dict) and _is_text(edit.get("instruction"))):
            stats.skip("malformed_field", f"{key}: edit {edit!r}"[:200])
        elif two_images("edit"):
            description = edit.get("target_caption") if _is_text(edit.get("target_caption")) else None
            operation = edit.get("operation") if _is_text(edit.get("operation")) else None
            samples.append(edit_sample(f"{key}/edit", images[0], edit["instruction"], images[1], description,
                                       operation))
    if "multi" in tasks and "multi_qa" in meta:
        for index, pair in _qa_pairs(meta, "multi_qa", key, stats):
            if two_images("multi_qa"):
                question_type = pair.get("type") if _is_text(pair.get("type")) else None
                samples.append(multi_image_sample(f"{key}/multi{index}", images, pair["question"], pair["answer"],
                                                  question_type))
    if codes is not None:
        for sample in samples:
            _image_parts_to_codes(sample)
    return samples


def _qa_pairs(meta: dict[str, Any], name: str, key: str, stats: DataStats) -> Iterator[tuple[int, dict]]:
    """(index, pair) for each well-formed {question, answer} of the list `meta[name]`; the rest are skipped
    and counted as malformed_field."""
    pairs = meta[name]
    if not isinstance(pairs, list):
        stats.skip("malformed_field", f"{key}: {name} is not a list: {pairs!r}"[:200])
        return
    for index, pair in enumerate(pairs):
        if isinstance(pair, dict) and _is_text(pair.get("question")) and _is_text(pair.get("answer")):
            yield index, pair
        else:
            stats.skip("malformed_field", f"{key}: {name}[{index}] {pair!r}"[:200])


def _image_parts_to_codes(sample: Sample) -> None:
    """{"type": "image", "image": codes} -> {"type": "image", "codes": codes}, in place."""
    for message in sample.messages:
        message["content"] = [
            {"type": "image", "codes": part["image"]} if part["type"] == "image" else part
            for part in message["content"]
        ]


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _pipeline(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    tasks: tuple[str, ...] | None,
    shuffle: int,
    seed: int,
    stats: DataStats | None,
    max_image_pixels: int,
    split: bool = True,
) -> wds.DataPipeline:
    """The pipeline of read_records (`tasks` None: decoded records) and read_samples (records expanded
    into Samples of `tasks`), shuffled after that when `shuffle`, reporting its skips at the end.

    Stages are webdataset objects or `partial`s of module functions, so the pipeline pickles
    into DataLoader workers under any start method. `split=False` gives every process and worker
    every shard (for callers that load a whole set and split it themselves, e.g. by index).
    """
    stats = DataStats() if stats is None else stats
    splitters = [wds.split_by_node, wds.split_by_worker] if split else []
    stages = [
        wds.SimpleShardList(resolve_urls(urls), seed=seed if shuffle else None),
        *splitters,
        partial(_read_shards, stats=stats),
        partial(_decode_records, stats=stats, max_image_pixels=max_image_pixels),
    ]
    if tasks is not None:
        stages.append(partial(_expand_records, tasks=tasks, stats=stats))
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    pipeline = wds.DataPipeline(*stages, partial(_report_at_end, stats=stats))
    pipeline.stats = stats
    return pipeline


class _ShardErrors:
    """A webdataset `handler=` for one shard: remember the exception and carry on reading."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __call__(self, exn: Exception) -> bool:
        self.errors.append(exn)
        return True


def _tar_error_reason(exn: Exception) -> str:
    if isinstance(exn, (tarfile.TarError, EOFError, zlib.error)):
        return "corrupt_tar"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    return "duplicate_member"  # the one ValueError webdataset's group_by_keys raises


def _read_shards(shards: Iterable[dict[str, str]], stats: DataStats) -> Iterator[dict[str, Any]]:
    """{"url"} per shard -> raw webdataset records {"__key__", "__url__", extension: bytes}.

    Each shard is read on its own (`_tar_members`, which also skips and counts bad members, then
    webdataset's group_by_keys): across shards group_by_keys keeps its current record open when an error swallows the end-of-shard marker,
    so a shard that breaks off mid-record would lend its partial record members of the next
    shard's first one. Per shard, the last record is held back until the shard ends cleanly;
    after a read error it is dropped, as it may be missing members.
    """
    for shard in shards:
        handler = _ShardErrors()
        pending = None
        members = _tar_members(shard, handler, stats)
        for record in wds.tariterators.group_by_keys(members, handler=handler):
            if pending is not None:
                yield pending
            pending = record
        reasons = sorted({_tar_error_reason(exn) for exn in handler.errors})
        for reason in reasons:
            stats.skip(reason, f"{shard['url']}: {handler.errors[0]!r}"[:300])
        if pending is not None and "corrupt_tar" in reasons:
            stats.skip("incomplete_record", f"{shard['url']}: {pending['__key__']}")
        elif pending is not None:
            yield pending


def member_name_ok(name: str) -> bool:
    """`{key}.{extension}` with a key `write_shards` accepts (`_KEY_PATTERN`: no `..`, not absolute, no odd
    characters) and an extension of letters, digits, `_`, `-` and dots."""
    key, extension = wds.tariterators.base_plus_ext(name)
    return (
        key is not None
        and _KEY_PATTERN.fullmatch(key) is not None
        and _EXTENSION_PATTERN.fullmatch(extension) is not None
    )


def _tar_members(shard: dict[str, str], handler: _ShardErrors, stats: DataStats) -> Iterator[dict[str, Any]]:
    """One shard's members {"fname", "data", "__url__"}, as webdataset's url_opener + tar_file_expander yield
    them (read errors go to `handler`), except that members webdataset would pass over silently or take as they
    are are skipped and counted: `non_regular_member` (a symlink, hard link, device or FIFO entry; folders are
    just skipped) and `bad_member_name` (not `member_name_ok`: no extension, a path that climbs out (`..`) or
    is absolute, an odd key). webdataset's own metadata members (`__...__`) are skipped as it skips them."""
    for source in wds.tariterators.url_opener([dict(shard)], handler=handler):
        url = source["url"]
        # Errors as webdataset handles them: one in a member goes to the handler and reading goes on; one in
        # the tar stream itself (truncated, not a tar) ends the shard.
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*") as stream:
                for info in stream:
                    stream.members = []  # streaming: keep no member list
                    try:
                        name = info.name
                        if info.isdir() or _META_MEMBER.match(name):
                            continue
                        if not info.isreg():
                            stats.skip("non_regular_member", f"{url}: {name!r} ({_member_kind(info)})"[:300])
                        elif not member_name_ok(name):
                            stats.skip("bad_member_name", f"{url}: {name!r}"[:300])
                        else:
                            data = stream.extractfile(info).read()
                            yield {"fname": name, "data": data, "__url__": url}
                    except Exception as exn:  # noqa: BLE001 - recorded by the handler, counted by reason
                        if handler(exn):
                            continue
                        break
        except Exception as exn:  # noqa: BLE001 - recorded by the handler, counted by reason
            if not handler(exn):
                break
        finally:
            close = getattr(source.get("stream"), "close", None)
            if close is not None:
                close()


def _member_kind(info: tarfile.TarInfo) -> str:
    kinds = {
        "issym": "symlink",
        "islnk": "hard link",
        "ischr": "character device",
        "isblk": "block device",
        "isfifo": "FIFO",
    }
    return next((kind for test, kind in kinds.items() if getattr(info, test)()), "special file")


def _decode_records(
    records: Iterable[dict[str, Any]], stats: DataStats, max_image_pixels: int
) -> Iterator[dict[str, Any]]:
    # A plain loop rather than wds.map(handler=...): wds.map writes `__key__` into every dict it
    # returns, and these records are the public {"key", "image", "json"} form.
    for record in records:
        try:
            decoded = _decode_record(record, max_image_pixels)
        except SkipSample as skip:
            stats.skip(skip.reason, f"{record.get('__url__')}: {record['__key__']}: {skip.detail}"[:300])
            continue
        stats.records += 1
        yield decoded


def _decode_record(record: dict[str, Any], max_image_pixels: int) -> dict[str, Any]:
    if "json" not in record:
        raise SkipSample("missing_json")
    try:
        meta = json.loads(record["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("invalid_json", str(exn)) from exn
    if not isinstance(meta, dict):
        raise SkipSample("invalid_json", f"expected an object, got {type(meta).__name__}")
    if CODES_EXTENSION in record:
        # Pre-tokenized: the codes stand for the image, which is not decoded even if present.
        grids = [decode_codes(record[CODES_EXTENSION])]
        while len(grids) < MAX_RECORD_IMAGES and (name := f"img{len(grids)}.{CODES_EXTENSION}") in record:
            grids.append(decode_codes(record[name]))
        return {"key": record["__key__"], "image": None, "images": [], "codes": grids[0], "codes_list": grids,
                "json": meta}  # fmt: skip
    images = []
    while len(images) < MAX_RECORD_IMAGES:
        prefix = f"img{len(images)}." if images else ""
        ext = next((ext for ext in IMAGE_EXTENSIONS if prefix + ext in record), None)
        if ext is None:
            break
        images.append(decode_image(record[prefix + ext], max_image_pixels))
    return {"key": record["__key__"], "image": images[0] if images else None, "images": images, "json": meta}


def _expand_records(
    records: Iterable[dict[str, Any]], tasks: tuple[str, ...], stats: DataStats
) -> Iterator[Sample]:
    for record in records:
        for sample in record_samples(record, tasks, stats):
            stats.samples += 1
            yield sample


def _report_at_end(items: Iterable[Any], stats: DataStats) -> Iterator[Any]:
    # `finally` so that an epoch cut short (with_epoch, break) still reports what it skipped.
    try:
        yield from items
    finally:
        if stats.total_skipped:
            logger.warning("data: %s", stats.report())
