import itertools
import json
import math

import pytest
import torch

from training.components import (
    LLMTrainConfig,
    draw_conversations,
    examples_needed,
    load_task_pools,
    make_collator,
    restore_inference_attention,
    set_training_attention,
    split_turns,
    tokenize_examples,
)
from training.config import load_config
from training.train_llm import main


@pytest.fixture(scope="module")
def loaded(tiny):
    from mllm.model import UnifiedMLLM

    return UnifiedMLLM.from_pretrained(tiny[0], device="cpu", dtype="fp32")


def _config(tiny, out, **overrides):
    model_dir, data = tiny
    base = {"model": str(model_dir), "data": str(data), "out": str(out), "tasks": {"caption": 1.0, "t2i": 1.0},
            "num_samples": 8, "per_device_batch_size": 4, "max_steps": 6, "warmup_steps": 0,
            "logging_steps": 1, "save_steps": 3, "precision": "fp32", "learning_rate": 3e-3, "max_length": 256}
    return load_config(LLMTrainConfig, {**base, **overrides})


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all({"loss", "learning_rate", "tokens_per_s"} <= set(r) for r in records)
    return [r["loss"] for r in records]


def test_full_run_lowers_loss_and_saves_a_model_folder(tiny, tmp_path):
    from mllm.model import UnifiedMLLM

    final = main(_config(tiny, tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert final == tmp_path / "run" / "model"
    assert (tmp_path / "run" / "checkpoint-6").is_dir()
    UnifiedMLLM.from_pretrained(final, device="cpu")


def test_lora_run_lowers_loss_and_saves_an_adapter_that_reloads(tiny, tmp_path):
    from mllm.model import UnifiedMLLM

    final = main(_config(tiny, tmp_path / "run", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         learning_rate=1e-2, packing=False))
    losses = _losses(tmp_path / "run")
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    # The adapter loads with plain peft onto the base's llm/ and gives the logits mllm's loader gives.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = UnifiedMLLM.from_pretrained(tiny[0], adapter=final, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny[0] / "llm", local_files_only=True)
    input_ids = torch.tensor([[1, 5, 9, model.config.image_offset + 3, 7]])
    with torch.no_grad():
        untuned = base(input_ids=input_ids).logits
        plain = PeftModel.from_pretrained(base, final).eval()(input_ids=input_ids).logits
        ours = model(input_ids=input_ids).logits
    torch.testing.assert_close(plain, ours, atol=1e-6, rtol=0)
    assert (plain - untuned).abs().max() > 1e-3  # and the adapter does change them


@pytest.mark.parametrize("attention", ["sdpa", "packed_eager"])
def test_packed_example_has_the_logits_it_has_alone(loaded, tiny, attention):
    pools = load_task_pools(str(tiny[1]), {"caption": 1.0, "t2i": 1.0})
    conversations = [pools["caption"][0].messages, pools["t2i"][0].messages, pools["caption"][1].messages]
    examples = tokenize_examples(loaded.processor, conversations, None)
    batch = make_collator(True, loaded.config.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(len(e["input_ids"]) for e in examples)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loaded.llm.config.use_cache = False  # as `main` trains: transformers honours packed position_ids only then
    assert set_training_attention(loaded.llm, attention) == attention
    try:
        with torch.no_grad():
            packed = loaded.llm(**inputs).logits[0]
            restore_inference_attention(loaded.llm)  # each example alone, with the default sdpa
            start = 0
            for example in examples:
                alone = loaded.llm(input_ids=torch.tensor([example["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[start:start + len(alone)], alone, atol=1e-4, rtol=0)
                start += len(alone)
    finally:
        restore_inference_attention(loaded.llm)
        loaded.llm.config.use_cache = True
    # The loss never crosses a boundary: each example's first label is ignored.
    assert batch["labels"][0, len(examples[0]["input_ids"])] == -100


def test_training_attention_defaults_to_packed_eager_on_cpu_and_the_saved_model_to_sdpa(tiny, tmp_path, capsys):
    from mllm.model import UnifiedMLLM

    cfg = _config(tiny, tmp_path / "run", max_steps=2)
    assert cfg.attn_implementation == "auto"
    final = main(cfg)
    assert "packed_eager attention" in capsys.readouterr().out
    assert "packed_eager" not in (final / "llm" / "config.json").read_text()
    assert UnifiedMLLM.from_pretrained(final, device="cpu").llm.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        _config(tiny, tmp_path / "bad", attn_implementation="flash")


def test_cfg_dropout_one_makes_every_t2i_prompt_unconditional(loaded, tiny):
    processor = loaded.processor
    pools = load_task_pools(str(tiny[1]), {"t2i": 1.0, "caption": 1.0})
    drawn = draw_conversations(pools, {"t2i": 1.0, "caption": 1.0}, processor, 1.0, 12, seed=0)
    t2i = [messages for task, messages in drawn if task == "t2i"]
    assert t2i and any(task == "caption" for task, _ in drawn)
    unconditional = processor.unconditional_draw_conversation()
    for messages in t2i:
        assert messages[:-1] == unconditional and messages[-1]["role"] == "assistant"
    # and the tokens before the first supervised one are exactly the unconditional prompt's
    reference = tokenize_examples(processor, [t2i[0]], None)[0]
    for example in tokenize_examples(processor, t2i, None):
        first = next(i for i, label in enumerate(example["labels"]) if label != -100)
        assert example["input_ids"][:first] == reference["input_ids"][:first]
    kept = draw_conversations(pools, {"t2i": 1.0}, processor, 0.0, 4, seed=0)
    assert all(messages[0] != unconditional[0] for _, messages in kept)


def test_vqa_turns_group_each_images_questions_into_multi_turn_examples(tiny, loaded):
    single = load_task_pools(str(tiny[1]), {"vqa": 1.0})["vqa"]
    grouped = load_task_pools(str(tiny[1]), {"vqa": 1.0}, vqa_turns=3, seed=0)["vqa"]
    assert load_task_pools(str(tiny[1]), {"vqa": 1.0}, vqa_turns=3, seed=0)["vqa"][0].messages == grouped[0].messages
    pairs = {}  # (record, question) -> answer, from the single-turn samples
    for sample in single:
        user, assistant = sample.messages
        pairs[(sample.key.rsplit("/vqa", 1)[0], user["content"][1]["text"])] = assistant["content"][0]["text"]
    seen, first_questions = [], set()
    for sample in grouped:
        record = sample.key.rsplit("/vqa", 1)[0]
        roles = [message["role"] for message in sample.messages]
        assert sample.task == "vqa" and 2 <= len(roles) <= 6 and roles == ["user", "assistant"] * (len(roles) // 2)
        users, answers = sample.messages[0::2], sample.messages[1::2]
        assert [part["type"] for part in users[0]["content"]] == ["image", "text"]  # the image once, first
        assert all([part["type"] for part in user["content"]] == ["text"] for user in users[1:])
        questions = [user["content"][-1]["text"] for user in users]
        first_questions.add(questions[0])
        for question, answer in zip(questions, answers):
            assert pairs[(record, question)] == answer["content"][0]["text"]  # its own image's answer
            seen.append((record, question))
    assert sorted(seen) == sorted(pairs)  # every pair exactly once
    assert len(grouped) < len(single) / 2
    assert len(first_questions) > 5  # shuffled: not always "How many objects are there?" first
    # every answer is supervised
    example = tokenize_examples(loaded.processor, [grouped[0].messages], None)[0]
    supervised = loaded.processor.text_tokenizer.decode([t for t in example["labels"] if t != -100])
    for answer in grouped[0].messages[1::2]:
        assert answer["content"][0]["text"] in supervised
    with pytest.raises(ValueError, match="vqa_turns"):
        _config(tiny, "unused", vqa_turns=0)


def test_branched_vqa_examples_train_every_turn_as_a_single_turn_example(tiny, loaded):
    processor = loaded.processor
    grouped = load_task_pools(str(tiny[1]), {"vqa": 1.0}, vqa_turns=4, seed=0)["vqa"]
    conversation = next(sample.messages for sample in grouped if len(sample.messages) == 8)
    tree = tokenize_examples(processor, [conversation], None, [True])[0]
    singles = tokenize_examples(processor, split_turns(conversation), None)
    assert len(singles) == 4
    branches = torch.tensor(tree["branch_ids"])
    positions, ids, labels = (torch.tensor(tree[key]) for key in ("position_ids", "input_ids", "labels"))
    assert len(tree["input_ids"]) < sum(len(single["input_ids"]) for single in singles)  # the image once
    assert int(loaded.vocab.is_image_id(ids).sum()) == loaded.vocab.tokens_per_image - 2  # codes only
    for branch, single in enumerate(singles, start=1):
        seen = (branches == 0) | (branches == branch)  # what a token of this branch attends to
        assert ids[seen].tolist() == single["input_ids"]
        assert labels[seen].tolist() == single["labels"]
        assert positions[seen].tolist() == list(range(len(single["input_ids"])))
    # every answer supervised once, no question supervised
    supervised = processor.text_tokenizer.decode([t for t in tree["labels"] if t != -100])
    for user, answer in zip(conversation[0::2], conversation[1::2]):
        assert answer["content"][0]["text"] in supervised
        assert user["content"][-1]["text"] not in supervised
    # a packed batch carries the tree's positions and branches, the other examples count from 0 in branch 0
    plain = tokenize_examples(processor, [conversation[:2]], None)[0]
    batch = make_collator(True, 0)([plain, tree])
    n = len(plain["input_ids"])
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["branch_ids"].shape
    assert batch["position_ids"][0, :n].tolist() == list(range(n)) and batch["branch_ids"][0, :n].eq(0).all()
    assert batch["position_ids"][0, n:].tolist() == tree["position_ids"]
    assert batch["branch_ids"][0, n:].tolist() == tree["branch_ids"]
    assert "branch_ids" not in make_collator(True, 0)([plain])


def test_branched_examples_need_the_packed_eager_attention(loaded):
    with pytest.raises(ValueError, match="vqa_branches"):
        set_training_attention(loaded.llm, "sdpa", tree=True)
    assert set_training_attention(loaded.llm, "auto", tree=True) == "packed_eager"
    restore_inference_attention(loaded.llm)


def test_the_mixture_is_drawn_to_what_the_run_consumes(tiny, monkeypatch):
    config = _config(tiny, "unused", num_samples=None, max_steps=7, per_device_batch_size=3,
                     gradient_accumulation_steps=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert examples_needed(config) == 42
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert examples_needed(config) == 84
    assert examples_needed(_config(tiny, "unused", num_samples=5)) == 5


def test_non_finite_loss_stops_the_run_with_a_clear_message(tiny, tmp_path):
    with pytest.raises(RuntimeError, match="loss became"):
        main(_config(tiny, tmp_path / "run", learning_rate=1e30, max_grad_norm=0.0, max_steps=4))
    assert not (tmp_path / "run" / "model").exists()


def test_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    import shutil

    out = tmp_path / "run"
    main(_config(tiny, out, max_steps=3))
    shutil.rmtree(out / "model")  # as if the run had been killed after its checkpoint at step 3
    main(_config(tiny, out, max_steps=6), resume=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "model" / "mllm_config.json").is_file()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [True, False])
def test_metrics_log_a_loss_per_task_consistent_with_the_loss(tiny, tmp_path, packing):
    import math

    out = tmp_path / "run"
    main(_config(tiny, out, max_steps=4, packing=packing))
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    seen = set()
    for record in records:
        tasks = [key[len("loss_"):] for key in record if key.startswith("loss_")]
        assert tasks and set(tasks) <= {"caption", "t2i"}, record
        seen |= set(tasks)
        for task in tasks:
            assert math.isfinite(record[f"loss_{task}"]) and record[f"label_tokens_{task}"] > 0
        # logging_steps=1, one process, no accumulation: `loss` is the token mean over the batch, so the
        # token-weighted combination of the per-task means is that same number.
        tokens = sum(record[f"label_tokens_{task}"] for task in tasks)
        combined = sum(record[f"loss_{task}"] * record[f"label_tokens_{task}"] for task in tasks) / tokens
        assert combined == pytest.approx(record["loss"], rel=1e-5), record
    assert seen == {"caption", "t2i"}


def _weights(folder):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(file).items()})
    return tensors


def test_killed_run_resumes_exactly(tiny, tmp_path, kill_after_checkpoint):
    straight = main(_config(tiny, tmp_path / "straight"))

    undo = kill_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        main(_config(tiny, tmp_path / "resumed"))
    undo()
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir() and not (tmp_path / "resumed" / "model").exists()
    resumed = main(_config(tiny, tmp_path / "resumed"), resume=True)

    expected, got = _weights(straight), _weights(resumed)
    assert expected and expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    straight_losses, resumed_losses = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["step"] for r in resumed_losses] == list(range(1, 7))
    for a, b in zip(straight_losses[3:], resumed_losses[3:]):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items() if k != "tokens_per_s"}


def test_two_processes_match_one_process_with_the_same_global_batch(tiny, tmp_path):
    """`torchrun --nproc_per_node 2 -m mllm.cli train` (gloo on CPU), 2 examples per process, logs the
    same per-step losses as one process with 4 examples per step: the sampler hands the two ranks the two
    halves of the one-process batch, and the loss is token-averaged across processes."""
    import os
    import subprocess
    import sys

    from training.config import save_config

    single = tmp_path / "single"
    main(_config(tiny, single, max_steps=4, save_steps=2))
    recipe = tmp_path / "ddp.yaml"
    save_config(_config(tiny, tmp_path / "unused", max_steps=4, save_steps=2, per_device_batch_size=2), recipe)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mllm.cli", "train", "--recipe", str(recipe), "--model", str(tiny[0]), "--data", str(tiny[1]),
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _records(single), _records(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # logged once, by the main process
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (one, two)
        assert {k for k in a if k.startswith("label_tokens_")} == {k for k in b if k.startswith("label_tokens_")}
        for key in (k for k in a if k.startswith("loss_")):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
            assert b["label_tokens_" + key[len("loss_"):]] == a["label_tokens_" + key[len("loss_"):]]
    assert (out / "model" / "mllm_config.json").is_file() and (out / "checkpoint-2").is_dir()


def test_qlora_run_trains_an_adapter_on_a_4bit_base(tiny, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'mllm[quant]')")
    out = tmp_path / "run"
    final = main(_config(tiny, out, quantization="4bit", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         max_steps=3, save_steps=3, packing=False))
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records), records
    assert final == out / "adapter"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_qlora_without_lora_and_bad_quantization_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="4bit.*needs a `lora`"):
        _config(tiny, tmp_path, quantization="4bit", lora=None)
    with pytest.raises(ValueError, match="quantization must be"):
        _config(tiny, tmp_path, quantization="8bit", lora={"r": 4})
    with pytest.raises(ValueError, match="freeze_llm"):
        _config(tiny, tmp_path, freeze_llm=True, lora={"r": 4})
    with pytest.raises(ValueError, match="weight_decay"):
        _config(tiny, tmp_path, freeze_llm=True, weight_decay=0.1)


def test_align_trains_only_the_new_vocabulary_rows(tiny, loaded, tmp_path):
    from mllm.lora import new_token_ids
    from mllm.model import UnifiedMLLM

    final = main(_config(tiny, tmp_path / "run", freeze_llm=True, max_steps=3, save_steps=3, learning_rate=1e-2))
    assert final == tmp_path / "run" / "model"
    before = UnifiedMLLM.from_pretrained(tiny[0], device="cpu", dtype="fp32").llm.state_dict()
    after = UnifiedMLLM.from_pretrained(final, device="cpu", dtype="fp32").llm.state_dict()
    ids = new_token_ids(loaded)
    assert before.keys() == after.keys()
    rows = {id(m.weight) for m in (loaded.llm.get_input_embeddings(), loaded.llm.get_output_embeddings()) if m}
    vocab_names = [name for name, p in loaded.llm.named_parameters() if id(p) in rows]
    vocab_names += [name for name in before if name.endswith("lm_head.weight") and name not in vocab_names]
    changed_rows = False
    for name in before:
        a, b = before[name], after[name]
        if name in vocab_names:
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[ids] = False
            assert torch.equal(a[keep], b[keep]), f"{name}: a row outside the new ids changed"
            changed_rows |= not torch.equal(a[ids], b[ids])
        else:
            assert torch.equal(a, b), f"{name} changed"
    assert changed_rows, "the new vocabulary rows did not train"


def test_max_steps_shortens_warmup_with_the_run_unless_it_is_set(monkeypatch, tmp_path):
    import argparse

    import mllm.commands.train as command
    import training.train_llm as recipe

    seen = []
    monkeypatch.setattr(recipe, "main", lambda cfg, resume=False: seen.append(cfg))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    base = ["--recipe", "shapes-pretrain", "--model", "m", "--data", "d", "--out", str(tmp_path)]
    command.run(parser.parse_args([*base, "--max-steps", "200"]))  # the recipe: 2000 steps, 100 of warmup
    command.run(parser.parse_args([*base, "--max-steps", "200", "--set", "warmup_steps=30"]))
    command.run(parser.parse_args([*base, "--max-steps", "4000"]))
    assert [(c.max_steps, c.warmup_steps) for c in seen] == [(200, 10), (200, 30), (4000, 100)]


def test_a_kill_in_the_final_adapter_save_never_leaves_a_torn_adapter(tiny, tmp_path, monkeypatch, kill):
    """The adapter is written aside and renamed into place: a kill midway leaves no OUT/adapter (which would
    read as a finished run), and --resume writes the adapter of the uninterrupted run."""
    from pathlib import Path

    from peft import PeftModel

    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "save_total_limit": 1}
    straight = main(_config(tiny, tmp_path / "straight", **lora))
    # The Trainer still rotates checkpoints (after making the new one durable).
    assert [p.name for p in (tmp_path / "straight").glob("checkpoint-*")] == ["checkpoint-6"]

    real_save = PeftModel.save_pretrained
    killer = kill(0)  # counts filesystem steps, never fires on its own

    def die_mid_save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        if not Path(directory).name.startswith("checkpoint-"):  # the final save, not a checkpoint's
            weights = Path(directory) / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # caught mid-write
            killer.die()  # and nothing after it runs (no cleanup)

    monkeypatch.setattr(PeftModel, "save_pretrained", die_mid_save)
    with pytest.raises(KeyboardInterrupt):
        main(_config(tiny, tmp_path / "killed", **lora))
    monkeypatch.setattr(PeftModel, "save_pretrained", real_save)
    killer.disarm()
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = main(_config(tiny, tmp_path / "killed", **lora), resume=True)
    expected, got = _weights(straight), _weights(resumed)
    assert expected and expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")) == []


def test_resume_after_a_torn_metrics_line(tiny, tmp_path, kill_after_checkpoint):
    """A kill while a metrics line is being appended leaves it torn: --resume drops it (as it drops every line
    after the checkpoint) instead of failing on it, and the log reads as the uninterrupted run's."""
    main(_config(tiny, tmp_path / "straight"))
    undo = kill_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        main(_config(tiny, tmp_path / "resumed"))
    undo()
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as log:
        log.write('{"step": 4, "loss": 5.1, "learn')  # the kill cut this line short
    main(_config(tiny, tmp_path / "resumed"), resume=True)

    def drop_speed(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert drop_speed(_records(tmp_path / "resumed")) == drop_speed(_records(tmp_path / "straight"))


def test_edit_loss_weights_mark_the_reply_codes_that_differ_from_the_source(loaded):
    from training.components import edit_loss_weights

    vocab = loaded.vocab
    n = loaded.config.image_tokens_per_image
    source = torch.arange(n) % loaded.config.codebook_size
    target = source.clone()
    target[[1, n - 2]] = (source[[1, n - 2]] + 1) % loaded.config.codebook_size  # two codes edited
    prompt = [5, *vocab.image_ids(source).tolist(), 7, 8]
    reply = vocab.image_ids(target).tolist()
    example = {"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply}
    weights = edit_loss_weights(example, vocab, 4.0)
    changed = [len(prompt) + 1 + 1, len(prompt) + 1 + n - 2]  # after the reply's <|boi|>
    assert len(weights) == len(example["input_ids"])
    assert [i for i, w in enumerate(weights) if w != 1.0] == changed and all(weights[i] == 4.0 for i in changed)
    assert edit_loss_weights(example, vocab, 1.0) is None  # the default weighs nothing
    alone = {"input_ids": [5, *reply], "labels": [-100, *reply]}  # the unconditional branch: no source
    assert edit_loss_weights(alone, vocab, 4.0) is None
    with pytest.raises(ValueError, match="edit_changed_weight must be > 0"):
        LLMTrainConfig(data="d", out="o", edit_changed_weight=0.0).validate()


@pytest.mark.parametrize("packing", [True, False])
def test_loss_weights_follow_their_tokens_into_the_batch_and_scale_their_terms(packing):
    from types import SimpleNamespace

    from training.components import TaskCollator, TaskLossTrainer

    plain = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "task": 0}
    weighted = {"input_ids": [4, 5, 6, 7], "labels": [-100, -100, 6, 7], "task": 1,
                "loss_weights": [1.0, 1.0, 1.0, 3.0]}
    batch = TaskCollator(make_collator(packing, 0), packing)([plain, weighted])
    if packing:
        assert batch["loss_weights"].tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]]
    else:
        assert batch["loss_weights"].tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0]]
    assert batch["task_ids"].shape == batch["labels"].shape
    assert "loss_weights" not in TaskCollator(make_collator(packing, 0), packing)([plain])

    torch.manual_seed(0)
    logits = torch.randn(*batch["labels"].shape, 9)
    owner = SimpleNamespace(task_names=["a", "b"], task_sums=None, args=SimpleNamespace())
    loss = TaskLossTrainer.language_model_loss(owner, logits, batch["labels"], batch["task_ids"],
                                               loss_weights=batch["loss_weights"])
    terms = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 9), batch["labels"][:, 1:].reshape(-1),
                                              reduction="none", ignore_index=-100)
    weights = batch["loss_weights"][:, 1:].reshape(-1)
    supervised = batch["labels"][:, 1:].reshape(-1) != -100
    expected = (terms * weights)[supervised].sum() / supervised.sum()
    torch.testing.assert_close(loss, expected)
    # the logs keep the plain per-task means: task b's two terms, unweighted
    b = (batch["task_ids"][:, 1:].reshape(-1) == 1) & supervised
    torch.testing.assert_close(owner.task_sums[0, 1].float(), terms[b].sum())
    assert owner.task_sums[1].tolist() == [2.0, 2.0]


def test_image_first_edits_can_train_the_start_of_the_reply_only(loaded):
    """edit_image_first_loss "start": an edit sent image first is cut after its reply's <|boi|>, so it trains
    the decision to draw and nothing of the drawing; an instruction-first edit keeps its whole reply."""
    from training.components import cut_after_reply_start, image_first_edit

    h, w = loaded.config.grid_size
    size = loaded.config.codebook_size
    source = {"type": "image", "codes": torch.arange(h * w).reshape(h, w) % size}
    target = {"type": "image", "codes": (torch.arange(h * w).reshape(h, w) + 1) % size}
    instruction = {"type": "text", "text": "make the circle blue"}
    reply = {"role": "assistant", "content": [target]}
    image_first = [{"role": "user", "content": [source, instruction]}, reply]
    text_first = [{"role": "user", "content": [instruction, source]}, reply]
    assert image_first_edit(image_first) and not image_first_edit(text_first)
    assert not image_first_edit([{"role": "user", "content": [source]}, reply])  # the instruction dropped
    whole, _ = tokenize_examples(loaded.processor, [image_first, text_first], 256)
    boi = loaded.config.boi_token_id
    cut = cut_after_reply_start(whole, boi)
    supervised = [(i, t) for i, (t, label) in enumerate(zip(cut["input_ids"], cut["labels"])) if label != -100]
    assert cut["input_ids"][-1] == boi and supervised == [(len(cut["input_ids"]) - 1, boi)]
    assert cut["input_ids"] == whole["input_ids"][:len(cut["input_ids"])]
    assert len(whole["input_ids"]) - len(cut["input_ids"]) >= h * w  # the edited image's codes are gone
    prompt_only = {"input_ids": whole["input_ids"][:5], "labels": [-100] * 5}
    assert cut_after_reply_start(prompt_only, boi) == prompt_only
    LLMTrainConfig(data="d", out="o", edit_image_first_loss="start").validate()
    with pytest.raises(ValueError, match="edit_image_first_loss must be one of"):
        LLMTrainConfig(data="d", out="o", edit_image_first_loss="codes").validate()
