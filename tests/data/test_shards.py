import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mllm.data.samples import CAPTION_PROMPT, DRAW_TEMPLATE, Sample, chat_sample, messages_to_json
from mllm.data.shapes import iter_samples
from mllm.data.shards import DataStats, read_records, read_samples, resolve_urls, write_shards


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes():
    return list(iter_samples(20, base_seed=3))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, shapes):
    out = tmp_path_factory.mktemp("shards")
    write_shards(shapes, out, maxcount=8, progress=False)
    return out


def test_write_shards_splits_by_maxcount_and_indexes(shard_dir, shapes):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index == {
        "shards": [
            {"file": "shard-000000.tar", "count": 8},
            {"file": "shard-000001.tar", "count": 8},
            {"file": "shard-000002.tar", "count": 4},
        ],
        "total": 20,
    }
    with pytest.raises(FileExistsError):
        write_shards(shapes[:1], shard_dir, maxcount=8, progress=False)


def test_plain_webdataset_reads_what_we_wrote(shard_dir, shapes):
    urls = str(shard_dir / "shard-{000000..000002}.tar")
    records = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [r["__key__"] for r in records] == [s["key"] for s in shapes]
    for record, sample in zip(records, shapes):
        assert np.array_equal(pixels(record["png"]), pixels(sample["image"]))
        assert record["json"] == {k: v for k, v in sample.items() if k not in ("key", "image")}


def test_read_records_round_trip(shard_dir, shapes):
    pipeline = read_records(shard_dir)
    records = list(pipeline)
    assert [r["key"] for r in records] == [s["key"] for s in shapes]
    for record, sample in zip(records, shapes):
        assert set(record) == {"key", "image", "images", "json"} and record["images"] == [record["image"]]
        assert record["image"].mode == "RGB"
        assert np.array_equal(pixels(record["image"]), pixels(sample["image"]))
        assert record["json"] == {k: v for k, v in sample.items() if k not in ("key", "image")}
    assert pipeline.stats.records == 20 and pipeline.stats.total_skipped == 0


def test_read_samples_expands_every_field(shard_dir, shapes):
    pipeline = read_samples(shard_dir)
    samples = list(pipeline)
    tasks = Counter(sample.task for sample in samples)
    assert tasks == {"caption": 20, "vqa": sum(len(s["qa"]) for s in shapes), "t2i": 20}
    assert len(samples) == pipeline.stats.samples == sum(2 + len(s["qa"]) for s in shapes)

    first = shapes[0]
    by_key = {sample.key: sample for sample in samples}
    caption = by_key[f"{first['key']}/caption"]
    assert caption.messages[0]["content"][1] == {"type": "text", "text": CAPTION_PROMPT}
    assert caption.messages[1]["content"] == [{"type": "text", "text": first["caption"]}]
    assert np.array_equal(pixels(caption.images[0]), pixels(first["image"]))
    vqa = by_key[f"{first['key']}/vqa1"]
    assert vqa.messages[0]["content"][1]["text"] == first["qa"][1]["question"]
    assert vqa.messages[1]["content"][0]["text"] == first["qa"][1]["answer"]
    draw = by_key[f"{first['key']}/t2i"]
    assert draw.messages[0]["content"] == [
        {"type": "text", "text": DRAW_TEMPLATE.format(prompt=first["prompt"])}
    ]
    assert draw.messages[1]["role"] == "assistant" and draw.messages[1]["content"][0]["type"] == "image"


def test_read_samples_task_filter_and_seeded_shuffle(shard_dir):
    assert {s.task for s in read_samples(shard_dir, tasks=("t2i",))} == {"t2i"}
    in_order = [s.key for s in read_samples(shard_dir)]
    shuffled = [s.key for s in read_samples(shard_dir, shuffle=50, seed=1)]
    assert shuffled == [s.key for s in read_samples(shard_dir, shuffle=50, seed=1)]
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    with pytest.raises(ValueError, match="unknown tasks"):
        read_samples(shard_dir, tasks=("captions",))


def test_resolve_urls(shard_dir, tmp_path):
    shards = [str(shard_dir / f"shard-00000{i}.tar") for i in range(3)]
    assert resolve_urls(shard_dir) == shards
    assert resolve_urls(str(shard_dir / "shard-{000000..000002}.tar")) == shards
    assert resolve_urls(shards[1:]) == shards[1:]
    with pytest.raises(FileNotFoundError):
        resolve_urls(tmp_path)  # a directory without shards


def test_dataloader_workers_read_every_record_once(shard_dir, shapes):
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(read_records(shard_dir), batch_size=None, num_workers=2)
    keys = [record["key"] for record in loader]
    assert sorted(keys) == sorted(s["key"] for s in shapes)
    assert len(keys) == len(set(keys)) == 20


def _tar(path, members):
    """Write (name, bytes) members in order with the standard library, to build broken shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_data_is_skipped_and_counted(tmp_path, shapes, caplog):
    image = png_bytes(shapes[0]["image"])
    big_image = png_bytes(Image.new("RGB", (128, 128), "white"))
    meta = json.dumps({"caption": "a caption", "qa": [{"question": "q?", "answer": "a"}]}).encode()
    _tar(
        tmp_path / "a-0.tar",
        [
            ("good0.json", meta), ("good0.png", image),
            ("badpng.json", meta), ("badpng.png", image[: len(image) // 2]),
            ("nojson.png", image),
            ("nofields.json", b'{"scene": {}}'), ("nofields.png", image),
            ("badjson.json", b'{"caption": '), ("badjson.png", image),
            ("notobject.json", b"[1, 2]"), ("notobject.png", image),
            ("huge.json", meta), ("huge.png", big_image),
            # Field-level problems: the record stays, only the bad sample goes.
            ("halfqa.json", b'{"caption": "ok", "qa": [{"question": "no answer?"}]}'), ("halfqa.png", image),
            ("noimage.json", b'{"caption": "needs an image"}'),
            ("textchat.json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()),
        ],
    )  # fmt: skip
    # A shard cut off inside its last record's image, followed by a good shard: the reader must
    # keep the first records, drop the cut one, and not merge it into the next shard.
    write_shards(shapes[:3], tmp_path / "cut", prefix="b", progress=False)
    whole = (tmp_path / "cut" / "b-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "cut" / "b-000000.tar") as tar:
        last = tar.getmembers()[-1]
    (tmp_path / "a-1.tar").write_bytes(whole[: last.offset_data + last.size // 2])
    write_shards(shapes[3:5], tmp_path / "next", prefix="c", progress=False)
    (tmp_path / "next" / "c-000000.tar").rename(tmp_path / "a-2.tar")

    with caplog.at_level(logging.WARNING, logger="mllm.data.shards"):
        pipeline = read_records(tmp_path, max_image_pixels=100 * 100)
        keys = [record["key"] for record in pipeline]
    good = ["good0", "nofields", "halfqa", "noimage", "textchat"]
    assert keys == good + [s["key"] for s in shapes[:2]] + [s["key"] for s in shapes[3:5]]
    assert pipeline.stats.skipped == {
        "corrupt_image": 1,
        "missing_json": 1,
        "invalid_json": 2,
        "image_too_large": 1,
        "corrupt_tar": 1,
        "incomplete_record": 1,
    }
    assert pipeline.stats.records == 9
    assert "skipped 7" in caplog.text and "corrupt_tar=1" in caplog.text

    stats = DataStats()
    samples = list(read_samples(tmp_path, max_image_pixels=100 * 100, stats=stats))
    assert stats.skipped - pipeline.stats.skipped == {
        "missing_fields": 1,
        "malformed_field": 1,
        "missing_image": 1,
    }
    by_record = Counter(sample.key.split("/")[0] for sample in samples)
    assert by_record["good0"] == 2 and by_record["halfqa"] == 1 and by_record["textchat"] == 1
    assert "nofields" not in by_record and "noimage" not in by_record


def test_chat_sample_binds_images_in_order():
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "two squares"},
    ]
    sample = chat_sample("k", messages, [red, blue])
    assert sample.images == [red, blue]
    assert sample.messages[1]["content"] == [{"type": "text", "text": "two squares"}]
    json_form, images = messages_to_json(sample.messages)
    assert images == [red, blue] and json_form[0] == messages[0]
    with pytest.raises(ValueError, match="2 image parts but 1 images"):
        chat_sample("k", messages, [red])
    with pytest.raises(ValueError, match="task"):
        Sample("k", "captioning", [])


def test_processes_split_shards_unless_told_not_to(shard_dir, shapes, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = [r["key"] for r in read_records(shard_dir)]
    assert rank1 == [s["key"] for s in shapes[8:16]]  # every 2nd shard from the 2nd: shard-000001
    everything = [r["key"] for r in read_records(shard_dir, split=False)]
    assert everything == [s["key"] for s in shapes]


def _special(tar_path, members):
    """Append members of any type: (name, type, data or link target)."""
    with tarfile.open(tar_path, "a") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = payload
                tar.addfile(info)
            elif kind == tarfile.DIRTYPE:
                info.mode = 0o755
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)


def test_bad_member_names_and_non_regular_members_are_skipped_and_counted(tmp_path, shapes):
    image = png_bytes(shapes[0]["image"])
    meta = json.dumps({"caption": "a caption"}).encode()
    _tar(
        tmp_path / "a-0.tar",
        [
            ("good.json", meta), ("good.png", image),
            ("README", b"no extension"),  # webdataset would pass over it silently
            ("../evil.json", meta), ("../evil.png", image),  # climbs out of the shard
            ("/abs/olute.json", meta),
            ("weird key!.json", meta),
            ("sub/../up.json", meta),
            ("__meta__", b"{}"),  # webdataset's own metadata: skipped, not counted
            ("nested/ok.json", meta), ("nested/ok.png", image),
        ],
    )  # fmt: skip
    _special(
        tmp_path / "a-0.tar",
        [
            ("folder", tarfile.DIRTYPE, None),  # structure, not data: skipped silently
            ("link.png", tarfile.SYMTYPE, "/etc/passwd"),
            ("hard.json", tarfile.LNKTYPE, "good.json"),
            ("pipe.json", tarfile.FIFOTYPE, None),
            ("device.png", tarfile.CHRTYPE, None),
            ("last.json", tarfile.REGTYPE, meta),
        ],
    )
    pipeline = read_records(tmp_path)
    records = list(pipeline)
    assert [r["key"] for r in records] == ["good", "nested/ok", "last"]
    assert pipeline.stats.skipped == {"bad_member_name": 6, "non_regular_member": 4}
    assert "README" in pipeline.stats.examples["bad_member_name"]


def _records_then_fail(records, fail_after):
    for index, record in enumerate(records):
        if index == fail_after:
            raise RuntimeError("the source broke off")
        yield record


def test_write_shards_leaves_nothing_partial_behind(tmp_path, shapes):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="broke off"):
        write_shards(_records_then_fail(shapes, 3), out, maxcount=2, progress=False)
    assert list(out.iterdir()) == []  # no shard, no index, no staging folder
    with pytest.raises(ValueError, match="record key"):
        write_shards([shapes[0], {"key": "../evil", "caption": "x"}], out, progress=False)
    assert list(out.iterdir()) == []

    # Shards being replaced stay as they were until the new ones are complete.
    write_shards(shapes[:3], out, maxcount=2, progress=False)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(RuntimeError, match="broke off"):
        write_shards(_records_then_fail(shapes[3:6], 1), out, maxcount=2, overwrite=True, progress=False)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    shards = write_shards(shapes[3:6], out, maxcount=2, overwrite=True, progress=False)
    assert sorted(path.name for path in out.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert shards == [str(out / "shard-000000.tar"), str(out / "shard-000001.tar")]
    assert [r["key"] for r in read_records(out)] == [s["key"] for s in shapes[3:6]]
