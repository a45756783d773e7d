"""`mllm pretokenize`: replace the images of shards by their code grids, once, before LLM training.

    mllm pretokenize --data DIR --vision-tokenizer DIR --out DIR [--batch-size 64] [--maxcount 1000]
                     [--device auto] [--precision auto] [--overwrite]

`--data` is shards or a plain folder of images (`mllm.data.image_folder`: each image becomes an image-only
record, keyed by its relative path, with JSON `{"path": relative path}`; images are resized so their shorter
side is the tokenizer's image size and centre-cropped, as everywhere).
Every record of `--data` is written to `--out` with the SAME `{key}.json` and, in place of its image,
`{key}.codes.npy`: the tokenizer's code grid (h, w), int16 when the codebook fits (K <= 32767), else
int32 (to keep shards small; readers widen codes to int64). Records without an image (text-only
chats) are copied as they are. Bad records (corrupt image, invalid JSON, a bad member name or a
non-regular member, already pre-tokenized, JSON holding a `key` / `image` / `codes` field) are skipped
and counted, as every reader does (`mllm.data.shards`). Nothing partial is left in `--out`: the shards
appear there only once all are written (`write_shards`), and an error midway removes what was written.
`--out/pretokenize.json` records the tokenizer's codebook size, grid and image size, the source, and
the counts, so a training run can check its shards match its tokenizer.

Codes depend on the tokenizer's weights: shards made with one tokenizer are meaningless to a model
built with another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

INFO_NAME = "pretokenize.json"
SHARD_PREFIX = "shard"
RESERVED_FIELDS = frozenset({"key", "image", "codes"})


def pretokenize(data: str | Path, vision_tokenizer: str | Path, out: str | Path, batch_size: int = 64,
                maxcount: int = 1000, device: str = "auto", precision: str = "auto", overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """`mllm pretokenize`: shards with images -> shards with code grids (`{key}.codes.npy`), plus
    OUT/pretokenize.json (returned) saying what was written, by which tokenizer, and what was skipped."""
    data, out = Path(data), Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if data.is_dir() and out.exists() and out.resolve() == data.resolve():
        raise ValueError("--out must differ from --data")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"--out {out} already holds {len(existing)} shards (e.g. {existing[0].name}); "
            "pass --overwrite to replace them"
        )
    foreign = [path for path in existing if not _is_our_shard(path.name)]
    if foreign:  # --overwrite removes only our own shards; a reader of --out would mix in the rest
        raise ValueError(f"--out {out} holds .tar files pretokenize did not write (e.g. {foreign[0].name}); remove them")

    from mllm.data.image_folder import is_image_folder, list_images, read_image_folder
    from mllm.data.shards import DataStats, read_records, resolve_urls, write_shards
    from mllm.io import write_file
    from mllm.runtime import resolve_device, resolve_precision
    from tokenizer_vision.model import DualCodebookTokenizer

    folder = is_image_folder(data)
    try:
        if folder:
            list_images(data)  # a folder without images fails here, before the tokenizer loads
            urls = [str(data)]
        else:
            urls = resolve_urls(data)
    except (FileNotFoundError, ValueError) as exn:
        raise type(exn)(f"--data: {exn}") from None
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    tokenizer = DualCodebookTokenizer.from_pretrained(vision_tokenizer, device=device)
    tokenizer.eval()

    stats = DataStats()
    if folder:
        records = read_image_folder(data, stats)
    else:
        records = read_records(urls, stats=stats, split=False)  # one process reads every shard
    counts = {"records_written": 0, "images_encoded": 0, "records_without_image": 0}
    encoded = pretokenize_records(records, tokenizer, batch_size, device, precision, stats, counts)
    try:
        shards = write_shards(encoded, out, prefix=SHARD_PREFIX, maxcount=maxcount, progress=progress,
                              overwrite=overwrite)
    except FileExistsError as exn:
        raise FileExistsError(f"{exn}; pass --overwrite to replace them") from None

    info = {
        "source": [os.path.abspath(url) if os.path.exists(url) else url for url in urls],
        "vision_tokenizer": os.path.abspath(vision_tokenizer),
        "codebook_size": int(tokenizer.codebook_size),
        "grid_size": list(tokenizer.grid_size),
        "image_size": int(tokenizer.image_size),
        "codes_dtype": codes_dtype(tokenizer.codebook_size).__name__,
        "precision": precision,
        "shards": [os.path.basename(path) for path in shards],
        **counts,
        "skipped": dict(sorted(stats.skipped.items())),
    }
    write_file(out / INFO_NAME, json.dumps(info, indent=1) + "\n")

    print(
        f"wrote {counts['records_written']} records ({counts['images_encoded']} images as "
        f"{info['grid_size'][0]}x{info['grid_size'][1]} codes, {counts['records_without_image']} text-only) "
        f"in {len(shards)} shards to {out} ({precision} on {device})"
    )
    print(stats.report())
    print(f"details: {out / INFO_NAME}")
    return info


def _is_our_shard(name: str) -> bool:
    stem = name[len(SHARD_PREFIX) + 1 : -len(".tar")]
    return name.startswith(SHARD_PREFIX + "-") and len(stem) == 6 and stem.isdigit()


def codes_dtype(codebook_size: int):
    """The smallest signed integer type for codes in [0, K): int16 up to K = 32767, else int32."""
    import numpy as np

    return np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32


def pretokenize_records(
    records: Iterable[dict[str, Any]],
    tokenizer,
    batch_size: int,
    device,
    precision: str,
    stats,
    counts: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded records -> `write_shards` input `{"key", "codes": ndarray (h, w), **json}`, in input order.

    Images are encoded `batch_size` at a time (one tokenizer call per batch, under no_grad and the
    autocast of `precision`). Records without an image pass through as JSON only; records that
    already carry codes are skipped and counted (`already_pretokenized`): their codes may come from
    another tokenizer; so are records whose JSON has a field write_shards reserves (`reserved_field`).
    `counts` (records_written, images_encoded, records_without_image) is updated as records are yielded.

    An image identical, pixel for pixel, to one of the last `_SEEN_IMAGES` encoded is not encoded again: the
    shapes world's edit and pair records repeat their scene's image right after it (a third of the encoder's
    work on the demo's data). The encoder is deterministic, so the codes are the same either way.
    """
    import hashlib
    from collections import OrderedDict

    import torch

    from mllm.runtime import autocast

    counts = {} if counts is None else counts
    dtype = codes_dtype(tokenizer.codebook_size)
    pending: list[dict[str, Any]] = []  # records in input order, since the last flush
    images = 0
    seen: OrderedDict[bytes, Any] = OrderedDict()  # pixel digest -> codes, the most recent last

    def digest(image) -> bytes:
        return hashlib.blake2b(f"{image.mode}{image.size}".encode() + image.tobytes(), digest_size=16).digest()

    def flush() -> Iterator[dict[str, Any]]:
        every_image = [image for record in pending for image in _images(record)]
        keys = [digest(image) for image in every_image]
        new = {key: image for key, image in zip(keys, every_image) if key not in seen}
        if new:
            with torch.no_grad(), autocast(precision, device):
                codes = tokenizer.encode(list(new.values()))  # (B, h, w)
            for key, grid in zip(new, codes.cpu().numpy().astype(dtype)):
                seen[key] = grid
        for key in keys:
            seen.move_to_end(key)
        grids = iter([seen[key] for key in keys])
        while len(seen) > _SEEN_IMAGES:
            seen.popitem(last=False)
        for record in pending:
            out = {**record["json"], "key": record["key"]}
            if record_images := _images(record):
                # One grid per image, in order; a record of several images keeps them all (img1.codes.npy, ...).
                codes_list = [next(grids) for _ in record_images]
                out["codes"] = codes_list if len(codes_list) > 1 else codes_list[0]
                counts["images_encoded"] = counts.get("images_encoded", 0) + len(codes_list)
            else:
                counts["records_without_image"] = counts.get("records_without_image", 0) + 1
            counts["records_written"] = counts.get("records_written", 0) + 1
            yield out
        pending.clear()

    for record in records:
        if record.get("codes") is not None:
            stats.skip("already_pretokenized", f"{record['key']}: has codes.npy already")
            continue
        if reserved := RESERVED_FIELDS & set(record["json"]):
            # write_shards takes these names from the record itself, not from its JSON.
            stats.skip("reserved_field", f"{record['key']}: JSON field(s) {sorted(reserved)} cannot be kept")
            continue
        pending.append(record)
        images += len(_images(record))
        if images >= batch_size:
            yield from flush()
            images = 0
    yield from flush()


# Images remembered (by a digest of their pixels) so that a repeated one is not encoded again.
_SEEN_IMAGES = 4096


def _images(record: dict[str, Any]) -> list:
    """Every image of a decoded record, in order (records of a plain folder carry only "image")."""
    return list(record.get("images") or ([] if record["image"] is None else [record["image"]]))
