import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mllm.data.llava import LlavaFormatError, convert_llava, read_llava, record_key, write_llava
from mllm.data.samples import CAPTION_PROMPT, Sample, caption_qa_chat
from mllm.data.shapes import iter_samples
from mllm.data.shards import DataStats, read_samples


def same_messages(a: list[dict], b: list[dict]) -> bool:
    """Equal roles and texts, and pixel-identical images."""
    if len(a) != len(b):
        return False
    for message_a, message_b in zip(a, b):
        if message_a["role"] != message_b["role"] or len(message_a["content"]) != len(message_b["content"]):
            return False
        for part_a, part_b in zip(message_a["content"], message_b["content"]):
            if part_a["type"] != part_b["type"]:
                return False
            if part_a["type"] == "text" and part_a["text"] != part_b["text"]:
                return False
            if part_a["type"] == "image" and not np.array_equal(
                np.asarray(part_a["image"]), np.asarray(part_b["image"])
            ):
                return False
    return True


@pytest.fixture(scope="module")
def chats():
    scenes = [
        caption_qa_chat(s["key"], s["image"], s["caption"], s["qa"]) for s in iter_samples(4, base_seed=5)
    ]
    text_only = Sample(
        "text-only",
        "chat",
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
    )
    drawing = Sample(
        "draw",
        "chat",
        [
            {"role": "user", "content": [{"type": "text", "text": "Draw a red square."}]},
            {
                "role": "assistant",
                "content": [{"type": "image", "image": Image.new("RGB", (16, 16), (220, 40, 40))}],
            },
        ],
    )
    return scenes + [text_only, drawing]


def test_caption_qa_chat_layout(chats):
    first = next(iter(iter_samples(1, base_seed=5)))
    chat = chats[0]
    assert chat.task == "chat"
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * (1 + len(first["qa"]))
    assert chat.messages[0]["content"][1]["text"] == CAPTION_PROMPT
    assert chat.messages[1]["content"][0]["text"] == first["caption"]
    assert chat.messages[-2]["content"][0]["text"] == first["qa"][-1]["question"]


def test_llava_round_trip_through_shards(tmp_path, chats):
    json_path = write_llava(chats, tmp_path / "llava", progress=False)
    records = json.loads(json_path.read_text())
    assert records[0]["conversations"][0] == {"from": "human", "value": "<image>\n" + CAPTION_PROMPT}
    assert "image" not in records[4] and records[5]["conversations"][1] == {"from": "gpt", "value": "<image>"}

    direct = list(read_llava(json_path, tmp_path / "llava"))
    stats = DataStats()
    shards = convert_llava(
        json_path, tmp_path / "llava", tmp_path / "shards", maxcount=4, stats=stats, progress=False
    )
    assert len(shards) == 2 and stats.records == 6 and stats.total_skipped == 0
    from_shards = list(read_samples(tmp_path / "shards", tasks=("chat",)))

    assert len(direct) == len(from_shards) == len(chats)
    for original, read, sharded in zip(chats, direct, from_shards):
        assert read.task == sharded.task == "chat"
        assert same_messages(original.messages, read.messages)
        assert same_messages(original.messages, sharded.messages)


def test_convert_keeps_original_image_bytes(tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=80)
    (tmp_path / "data.json").write_text(
        json.dumps([{"id": "coco/0001.jpg", "image": "photo.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "Noise."}]}])
    )  # fmt: skip
    convert_llava(tmp_path / "data.json", tmp_path, tmp_path / "shards", progress=False)
    (record,) = list(wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False))
    assert record["__key__"] == record_key(0, "coco/0001.jpg") == "000000000_coco_0001_jpg"
    assert record["jpg"] == (tmp_path / "photo.jpg").read_bytes()
    meta = json.loads(record["json"])
    assert meta["id"] == "coco/0001.jpg"
    assert meta["messages"][0] == {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}],
    }


def test_read_llava_skips_and_counts_bad_records(tmp_path, caplog):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    turn = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]
    entries = [
        {"id": "good", "image": "ok.png", "conversations": turn},
        {"id": "missing", "image": "nowhere.png", "conversations": turn},
        {"id": "corrupt", "image": "broken.png", "conversations": turn},
        {"id": "no-token", "image": "ok.png", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "no-image", "conversations": turn},
        {"id": "bad-speaker", "conversations": [{"from": "robot", "value": "Hi"}]},
        {"id": "no-conversation", "image": "ok.png"},
        {"id": "two-images", "image": ["ok.png", "ok.png"], "conversations": turn},
        "not a record",
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    stats = DataStats()
    samples = list(read_llava(tmp_path / "data.json", tmp_path, stats=stats))
    assert [s.key for s in samples] == ["000000000_good", "000000009_text"]
    assert samples[0].messages[0]["content"][1] == {"type": "text", "text": "What colour?"}
    assert samples[0].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert stats.skipped == {
        "missing_image": 1,
        "corrupt_image": 1,
        "image_token_mismatch": 2,
        "malformed_conversation": 2,
        "malformed_record": 2,
    }
    assert "missing_image=1" in caplog.text


def test_read_llava_rejects_a_file_that_is_not_a_list(tmp_path):
    (tmp_path / "data.json").write_text('{"id": 1}')
    with pytest.raises(LlavaFormatError, match="JSON list"):
        list(read_llava(tmp_path / "data.json", tmp_path))
    (tmp_path / "data.json").write_text('[{"id": 1,')
    with pytest.raises(LlavaFormatError, match="not valid JSON"):
        list(read_llava(tmp_path / "data.json", tmp_path))


TURN = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]


def _llava_file(path, images):
    path.write_text(
        json.dumps([{"id": f"r{i}", "image": image, "conversations": TURN} for i, image in enumerate(images)])
    )
    return path


def test_image_paths_that_lead_outside_the_root_are_never_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8), "blue").save(root / "sub" / "ok.png")
    Image.new("RGB", (8, 8), "red").save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "leak.png")  # a symlink out of the root
    os.symlink(outside, root / "door")  # a folder symlink out of the root
    os.symlink(root / "sub" / "ok.png", root / "alias.png")  # a symlink that stays inside: fine
    images = [
        "sub/ok.png",
        "../outside/secret.png",
        "sub/../../outside/secret.png",
        str(outside / "secret.png"),
        "leak.png",
        "door/secret.png",
        "alias.png",
        "sub/../sub/ok.png",
        "bad\x00name.png",
    ]
    data = _llava_file(tmp_path / "data.json", images)
    stats = DataStats()
    samples = list(read_llava(data, root, stats=stats))
    assert [s.key for s in samples] == ["000000000_r0", "000000006_r6", "000000007_r7"]
    assert all(s.images[0].getpixel((0, 0)) == (0, 0, 255) for s in samples)  # never the red secret
    assert stats.skipped == {"image_outside_root": 5, "malformed_record": 1}
    assert "secret.png" in stats.examples["image_outside_root"]

    convert_stats = DataStats()
    convert_llava(data, root, tmp_path / "shards", stats=convert_stats, progress=False)
    assert convert_stats.skipped == stats.skipped
    assert len(list(read_samples(tmp_path / "shards"))) == 3


def test_a_fifo_or_a_folder_as_image_is_skipped_without_blocking(tmp_path):
    import threading

    Image.new("RGB", (8, 8), "blue").save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    (tmp_path / "folder.png").mkdir()
    data = _llava_file(tmp_path / "data.json", ["pipe.png", "folder.png", "ok.png"])
    stats, result = DataStats(), {}

    def convert():
        result["shards"] = convert_llava(data, tmp_path, tmp_path / "shards", stats=stats, progress=False)

    worker = threading.Thread(target=convert, daemon=True)
    worker.start()
    worker.join(timeout=20)
    try:
        assert not worker.is_alive(), "the converter blocks on the FIFO"
    finally:
        if worker.is_alive():  # release the blocked open() so the thread can end
            os.close(os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=20)
    assert stats.skipped == {"not_regular_file": 2}
    assert [s.key for s in read_samples(tmp_path / "shards")] == ["000000002_r2/chat"]
