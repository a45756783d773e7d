import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from mllm import cli
from mllm.data import pretokenize
from mllm.data.shapes import iter_samples
from mllm.data.shards import EncodedImage, read_records, read_samples, record_samples, write_shards
from mllm.runtime import autocast, resolve_precision
from tokenizer_vision.model import DualCodebookTokenizer

CHAT = [
    {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Hi there."}]},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("vision_tokenizer")
    DualCodebookTokenizer.from_name("tiny").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return DualCodebookTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def shapes():
    return list(iter_samples(6, size=32))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, shapes):
    """6 shapes scenes, a text-only chat and a corrupt image, in shards of 4."""
    records = [
        *shapes[:3],
        {"key": "broken", "image": EncodedImage(b"not a png at all", "png"), "caption": "lost"},
        {"key": "textonly", "messages": CHAT},
        *shapes[3:],
    ]
    out = tmp_path_factory.mktemp("source")
    write_shards(records, out, maxcount=4, progress=False)
    return out


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory, source_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("pretokenized")
    info = pretokenize.pretokenize(source_dir, tokenizer_dir, out, batch_size=4, maxcount=3, device="cpu",
                                   precision="fp32", progress=False)
    assert info["records_written"] > 0
    return out


def raw_records(directory):
    urls = sorted(str(path) for path in directory.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_codes_equal_encode_and_json_is_kept(pretokenized, shapes, tokenizer):
    records = {record["__key__"]: record for record in raw_records(pretokenized)}
    assert sorted(records) == sorted([s["key"] for s in shapes] + ["textonly"])
    expected = tokenizer.encode([s["image"] for s in shapes])  # (6, h, w)
    for sample, want in zip(shapes, expected):
        record = records[sample["key"]]
        assert "png" not in record
        codes = np.load(io.BytesIO(record["codes.npy"]), allow_pickle=False)
        assert codes.dtype == np.int16 and codes.shape == tuple(tokenizer.grid_size)
        assert np.array_equal(codes, want.numpy())
        assert json.loads(record["json"]) == {k: v for k, v in sample.items() if k not in ("key", "image")}
    assert "codes.npy" not in records["textonly"] and "png" not in records["textonly"]
    assert json.loads(records["textonly"]["json"]) == {"messages": CHAT}


def test_info_file_counts_and_describes_the_tokenizer(pretokenized, source_dir, tokenizer):
    info = json.loads((pretokenized / "pretokenize.json").read_text())
    assert info["codebook_size"] == tokenizer.codebook_size
    assert info["grid_size"] == list(tokenizer.grid_size)
    assert info["image_size"] == tokenizer.image_size
    assert info["codes_dtype"] == "int16"
    assert all(str(source_dir) in url for url in info["source"])
    assert info["records_written"] == 7 and info["images_encoded"] == 6 and info["records_without_image"] == 1
    assert info["skipped"] == {"corrupt_image": 1}
    assert json.loads((pretokenized / "index.json").read_text())["total"] == 7


def test_plain_webdataset_decodes_codes(pretokenized, shapes, tokenizer):
    urls = sorted(str(path) for path in pretokenized.glob("*.tar"))
    decoded = {r["__key__"]: r for r in wds.WebDataset(urls, shardshuffle=False).decode()}
    expected = tokenizer.encode([shapes[0]["image"]])[0]
    assert np.array_equal(decoded[shapes[0]["key"]]["codes.npy"], expected.numpy())


def test_read_records_and_samples_carry_codes(pretokenized, shapes, tokenizer):
    from mllm.processor import MultimodalProcessor
    from mllm.text_tokenizer import shapes_text_corpus, train_text_tokenizer

    records = {record["key"]: record for record in read_records(pretokenized)}
    first = records[shapes[0]["key"]]
    assert first["image"] is None and first["codes"].dtype == torch.long
    assert torch.equal(first["codes"], tokenizer.encode([shapes[0]["image"]])[0])
    assert "codes" not in records["textonly"]

    text_tokenizer = train_text_tokenizer(shapes_text_corpus(200), vocab_size=256)
    processor, _ = MultimodalProcessor.build(text_tokenizer, tokenizer)
    from_codes = {sample.key: sample for sample in read_samples(pretokenized)}
    for source in shapes[:2]:
        image_record = {"key": source["key"], "image": source["image"],
                        "json": {k: v for k, v in source.items() if k not in ("key", "image")}}  # fmt: skip
        for image_sample in record_samples(image_record):
            codes_sample = from_codes[image_sample.key]
            parts = [p for m in codes_sample.messages for p in m["content"] if p["type"] == "image"]
            assert len(parts) == 1 and set(parts[0]) == {"type", "codes"}
            want = processor(image_sample.messages)["input_ids"]
            assert torch.equal(processor(codes_sample.messages)["input_ids"], want)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_corrupt_codes_are_skipped_and_counted(tmp_path):
    meta = json.dumps({"caption": "a red square"}).encode()
    _tar(
        tmp_path / "shard-000000.tar",
        [
            ("good.codes.npy", _npy(np.zeros((2, 2), np.int16))), ("good.json", meta),
            ("garbage.codes.npy", b"\x93NUMPY broken"), ("garbage.json", meta),
            ("pickled.codes.npy", _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)),
            ("pickled.json", meta),
            ("floats.codes.npy", _npy(np.zeros((2, 2), np.float32))), ("floats.json", meta),
        ],
    )  # fmt: skip
    pipeline = read_samples(tmp_path)
    samples = list(pipeline)
    assert [s.key for s in samples] == ["good/caption"]
    assert pipeline.stats.skipped == {"corrupt_codes": 3}


def test_cli_refuses_a_non_empty_output_unless_overwrite(
    pretokenized, source_dir, tokenizer_dir, shapes, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(pretokenized, out)
    argv = ["pretokenize", "--data", str(source_dir), "--vision-tokenizer", str(tokenizer_dir),
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite with the default precision (bf16 autocast where the CPU has it).
    assert cli.main([*argv, "--overwrite", "--device", "cpu", "--batch-size", "64"]) == 0
    assert "wrote 7 records" in capsys.readouterr().out
    tokenizer = DualCodebookTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad(), autocast(resolve_precision("auto", "cpu"), "cpu"):
        expected = tokenizer.encode([s["image"] for s in shapes])
    records = {r["key"]: r for r in read_records(out)}
    assert torch.equal(torch.stack([records[s["key"]]["codes"] for s in shapes]), expected)


def test_bad_member_names_are_skipped_and_counted_not_a_traceback(tmp_path, shapes, tokenizer_dir):
    source = tmp_path / "source"
    write_shards(shapes[:2], source, progress=False)
    with tarfile.open(source / "shard-000000.tar") as tar:
        png = tar.extractfile(f"{shapes[0]['key']}.png").read()
    meta = json.dumps({"caption": "a red square"}).encode()
    _tar(source / "shard-000001.tar", [
        ("../evil.json", meta), ("../evil.png", png),  # would become a member outside --out
        ("noextension", meta),
        ("weird key.json", meta), ("weird key.png", png),
        ("fine.json", meta), ("fine.png", png),
    ])  # fmt: skip
    out = tmp_path / "out"
    info = pretokenize.pretokenize(source, tokenizer_dir, out, batch_size=4, device="cpu", precision="fp32",
                                   progress=False)  # fmt: skip
    assert info["records_written"] == 3 and info["skipped"] == {"bad_member_name": 5}
    assert sorted(r["key"] for r in read_records(out)) == sorted([s["key"] for s in shapes[:2]] + ["fine"])


def test_an_error_midway_leaves_no_partial_output(tmp_path, source_dir, tokenizer_dir, monkeypatch):
    out = tmp_path / "out"
    real_encode = DualCodebookTokenizer.encode
    calls = []

    def encode_then_fail(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_encode(self, images)

    monkeypatch.setattr(DualCodebookTokenizer, "encode", encode_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        pretokenize.pretokenize(source_dir, tokenizer_dir, out, batch_size=2, maxcount=1, device="cpu",
                                precision="fp32", progress=False)  # fmt: skip
    assert list(out.iterdir()) == []  # the shards of the first batch were never moved in
