"""The teacher recipe makes an ordinary CLIP folder that the tokenizer loads as its semantic tower."""

import torch
from transformers import AutoModel, AutoTokenizer, CLIPModel

from mllm.data.shapes import iter_samples
from mllm.data.shards import write_shards
from training.config import load_config
from training.train_teacher import TeacherConfig, main


def test_teacher_trains_and_loads_as_the_tokenizers_semantic_tower(tmp_path):
    from tokenizer_vision import DualCodebookTokenizer

    data = tmp_path / "data"
    write_shards(iter_samples(48, "train", base_seed=1, size=32), data, progress=False)
    cfg = load_config(TeacherConfig, "teacher-shapes", [
        f"data={data}", f"out={tmp_path / 'teacher'}", "image_size=32", "vision_hidden_size=32", "vision_layers=1",
        "text_hidden_size=32", "text_layers=1", "projection_dim=16", "batch_size=16", "max_steps=12",
        "warmup_steps=2", "precision=fp32", "device=cpu", "log_every=4",
    ])
    out = main(cfg)
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    clip = AutoModel.from_pretrained(out)
    assert isinstance(clip, CLIPModel)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["a small red circle at the top left"])["input_ids"][0]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids

    vision = DualCodebookTokenizer.from_name("tiny", teacher_path=str(out), teacher_config=None)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    features = vision.teacher_features(pixels)
    assert features.shape[:2] == (2, 32) and features.shape[2:] == vision.grid_size
    # The frozen teacher inside the tokenizer holds exactly the trained CLIP vision weights.
    trained = clip.vision_model.state_dict()
    copied = vision.teacher.state_dict()
    for name, weight in trained.items():
        matches = [k for k in copied if k == name or k.endswith("." + name)]
        assert len(matches) == 1, name
        assert torch.equal(weight, copied[matches[0]]), name
