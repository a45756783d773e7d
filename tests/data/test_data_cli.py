import json

import pytest
import webdataset as wds

from mllm.cli import main as mllm_main
from mllm.data.shapes import iter_samples


def data(*argv: str) -> int:
    """`mllm data ARGV` through the dispatcher: user errors come back as exit code 2 and one line."""
    return mllm_main(["data", *argv])


def test_shapes_writes_shards_plain_webdataset_reads(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert (
        data("shapes", "--n", "12", "--out", str(out), "--seed", "7", "--maxcount", "5", "--no-progress") == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 12 records in 3 shards" in printed and str(out / "shard-000002.tar") in printed

    records = list(wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False).decode("pil"))
    expected = list(iter_samples(12, "train", base_seed=7))
    assert [r["__key__"] for r in records] == [s["key"] for s in expected]
    assert records[3]["json"]["caption"] == expected[3]["caption"]
    assert records[3]["png"].size == (64, 64)


def test_shapes_through_the_mllm_command(tmp_path, capsys):
    out = tmp_path / "test-split"
    code = mllm_main(
        ["data", "shapes", "--n", "3", "--out", str(out), "--split", "test", "--size", "32", "--no-progress"]
    )
    assert code == 0
    records = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode("pil"))
    assert [r["__key__"] for r in records] == [s["key"] for s in iter_samples(3, "test")]
    assert records[0]["png"].size == (32, 32)


def test_shapes_resized_share(tmp_path, capsys):
    out = tmp_path / "mixed"
    assert data("shapes", "--n", "40", "--out", str(out), "--size", "32", "--resized-share", "0.5", "--no-progress") == 0
    records = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode("pil"))
    expected = list(iter_samples(40, "train", size=32, resized_share=0.5))
    assert [r["json"].get("rendered_size") for r in records] == [s.get("rendered_size") for s in expected]
    assert 0 < sum("rendered_size" in r["json"] for r in records) < 40
    assert all(("prompt" in r["json"]) == ("rendered_size" not in r["json"]) for r in records)
    assert all(r["png"].tobytes() == s["image"].tobytes() for r, s in zip(records, expected))
    with pytest.raises(SystemExit) as exit_info:
        data("shapes", "--n", "2", "--out", str(out), "--resized-share", "2", "--overwrite")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("mllm data: error: argument --resized-share: must be in [0, 1], got 2 "
                                       "(see `mllm data shapes --help`)\n")


def test_shapes_llava_format(tmp_path, capsys):
    out = tmp_path / "llava"
    assert data("shapes", "--n", "4", "--out", str(out), "--format", "llava", "--no-progress") == 0
    records = json.loads((out / "llava.json").read_text())
    expected = list(iter_samples(4))
    assert [r["id"] for r in records] == [s["key"] for s in expected]
    assert all((out / r["image"]).is_file() for r in records)
    assert records[0]["conversations"][1] == {"from": "gpt", "value": expected[0]["caption"]}
    assert len(records[0]["conversations"]) == 2 + 2 * len(expected[0]["qa"])
    assert "convert-llava" in capsys.readouterr().out

    # The printed follow-up command works and reports nothing skipped.
    assert data("convert-llava", "--json", str(out / "llava.json"), "--image-root", str(out), "--out", str(tmp_path / "s"), "--no-progress") == 0  # fmt: skip
    assert "read 4 records; nothing skipped" in capsys.readouterr().out


def test_convert_llava_reports_skips(tmp_path, capsys):
    (tmp_path / "data.json").write_text(
        json.dumps([{"id": "a", "image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
                    {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    )  # fmt: skip
    assert data("convert-llava", "--json", str(tmp_path / "data.json"), "--image-root", str(tmp_path), "--out", str(tmp_path / "s"), "--no-progress") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote 1 records in 1 shards" in printed
    assert "skipped 1: missing_image=1" in printed and "gone.jpg" in printed


def test_bad_paths_are_clear_errors(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert data("convert-llava", "--json", str(tmp_path / "nope.json"), "--image-root", str(tmp_path), "--out", str(tmp_path / "o")) == 2  # fmt: skip
    assert "--json" in capsys.readouterr().err
    assert data("convert-llava", "--json", str(a_file), "--image-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2  # fmt: skip
    assert "--image-root" in capsys.readouterr().err
    assert data("convert-llava", "--json", str(a_file), "--image-root", str(tmp_path), "--out", str(tmp_path / "o")) == 2  # fmt: skip
    assert "cannot read" in capsys.readouterr().err  # a text file is not LLaVA JSON
    assert data("shapes", "--n", "2", "--out", str(a_file)) == 2
    assert "not a directory" in capsys.readouterr().err

    out = tmp_path / "again"
    assert data("shapes", "--n", "2", "--out", str(out), "--no-progress") == 0
    assert data("shapes", "--n", "2", "--out", str(out), "--no-progress") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data("shapes", "--n", "2", "--out", str(out), "--no-progress", "--overwrite") == 0

    with pytest.raises(SystemExit) as exit_info:
        data("shapes", "--n", "0", "--out", str(out))
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data("shapes", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--n", "--seed", "--size", "--split", "--format", "--maxcount", "--overwrite",
                   "--resized-share"):
        assert option in text
    assert "multi-turn chat" in text
