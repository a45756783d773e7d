"""The parts the language-model recipes (training.train_llm, training.train_ett) are built from.

A recipe is a short `main(cfg, resume) -> Path` that reads as setup -> train -> save; what two recipes
share lives here, once:

- config: `LLMTrainConfig` (an ETT recipe's config extends it);
- data: task pools read from shards, the seeded task mixture (`draw_conversations`), tokenizing, and
  multi-turn vqa as branches off one image (`split_turns`, `branch_turns`);
- collators: padding, packing (with branches), per-token task ids;
- attention: the training attention and the inference one it is restored to;
- the trainer (`TaskLossTrainer`: one cross-entropy feeds the loss and the per-task losses), its
  callbacks (metrics.jsonl, the NaN guard) and `training_arguments`;
- runs: seeding (`start_run`), the recipe file, `train` (checkpoints, resume, NaN guard), the align
  stage's row mask.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import (
    DataCollatorWithFlattening,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from mllm.attention import register as register_packed_eager
from mllm.data.arrays import check_data_path
from mllm.data.samples import TASKS, Sample
from mllm.data.shapes_tasks import EDIT_OPERATIONS
from mllm.data.shards import DataStats, read_records, record_samples
from mllm.io import fsync_path, fsync_tree, recover_dir, rewrite_jsonl, write_dir
from mllm.lora import LoraSettings, new_token_ids
from mllm.runtime import keep_freed_memory, resolve_precision
from tokenizer_vision.schema import unknown_name
from training.config import save_config

try:  # transformers 5: the Trainer's checkpoint rotation, called after each save (see TaskLossTrainer)
    from transformers.trainer_utils import rotate_checkpoints as _rotate_checkpoints
except ImportError:  # pragma: no cover - other versions rotate inside _save_checkpoint, before the fsync
    _rotate_checkpoints = None

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
METRICS_NAME = "metrics.jsonl"
RECIPE_NAME = "train_recipe.yaml"  # the config a run trained with, under OUT (loads back with --recipe)
TRAIN_ATTN_IMPLEMENTATIONS = ("auto", "packed_eager", "eager", "sdpa", "flash_attention_2")
TOKENIZE_BATCH = 32  # conversations per processor call (one vision-tokenizer call for their images)
# Tasks whose questions about one record's images are grouped into multi-turn examples (vqa_turns) and, with
# vqa_branches and packing, trained as branches off the images.
BRANCHED_TASKS = ("vqa", "multi")
# LLMTrainConfig.edit_image_first_loss: what an edit example sent image first trains.
EDIT_IMAGE_FIRST_LOSSES = ("all", "start")


@dataclass
class LLMTrainConfig:
    """An LLM recipe (`mllm train`): the task mixture, LoRA or full, and the Trainer's settings."""

    recipe_kind: ClassVar[str] = "llm"

    model: str = ""  # a model folder (`mllm init`, or OUT/model of an earlier stage)
    data: str = ""  # shards (raw or `mllm pretokenize`d)
    out: str = ""
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "t2i": 1.0})  # mixture weights
    cfg_dropout: float = 0.1  # fraction of t2i examples trained with the unconditional prompt
    # Editing's unconditional branches (`mllm.generation.edit_images`, guidance="instruction" | "both"): the
    # fraction of edit examples trained with the image alone (instruction dropped), and with the
    # unconditional draw prompt instead of image and instruction (both dropped).
    edit_drop_instruction: float = 0.05
    edit_drop_both: float = 0.05
    # The share of edit examples (of those that keep both) whose user turn is the image, then the instruction:
    # the order a chat client sends them in. The rest keep the instruction first (`edit_sample`).
    edit_image_first: float = 0.0
    # What those image-first examples train: "all" (the whole reply, the edited image included) or "start" (the
    # reply's <|boi|> only: the example is cut after it). "start" teaches the model to start drawing when a
    # client sends the image first, while the drawing itself is learned in the instruction-first order only;
    # chat then draws an edit from the turn read instruction first (`mllm.generation.chat`). Drawing from both
    # orders cost edits in the instruction-first order (docs/experiments.md, section 26).
    edit_image_first_loss: str = "all"
    # Edit records that describe their result (`target_caption`) train replies that say it before drawing
    # it (`edit_sample`) when true; false (the default) trains image-only replies from the same data. In a
    # trial with whole-image codes, describing first did not help (docs/experiments.md, section 16).
    edit_describe: bool = False
    # The loss weight of an edited image's codes that differ from the source image's code at the same grid
    # position (`edit_loss_weights`); the codes an edit leaves alone keep weight 1. Most of an edit's codes are
    # copies, so without it the few codes that carry the instruction are a small part of the edit's loss. At 4
    # every figure of the demo fell (docs/experiments.md, section 21): 1 by default.
    edit_changed_weight: float = 1.0
    # Weights of the edit operations (`{"move": 2.0}`): an edit example of a named operation is drawn that many
    # times as often as one of weight 1 (operations not named, and edits whose record names no operation, keep
    # 1; 0 leaves an operation out). Empty (the default): edits are drawn as the data holds them.
    edit_operations: dict[str, float] = field(default_factory=dict)
    # Two-image question types also drawn alone, one question an example, as extra entries of the mixture with
    # these weights (`{"change": 0.75}`: the pool `multi/change`, weighed against `tasks`); the `multi` task keeps
    # every question, grouped by record. Empty (the default): none. "What changed between the two images?" is
    # learned only from many such questions in a row: one among a record's six, it stayed at 18% where 600 steps
    # of it alone lifted it to 60%, at the other questions' expense (docs/experiments.md, section 35).
    multi_types: dict[str, float] = field(default_factory=dict)
    lora: LoraSettings | None = None  # null = full fine-tune of the LLM
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    warmup_steps: int = 50
    lr_scheduler: str = "cosine"  # any transformers SchedulerType name
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    max_length: int | None = None  # longest example in tokens (default: the model's context length)
    packing: bool = True  # concatenate a batch into one row; position_ids restart per example
    attn_implementation: str = "auto"  # auto: packed_eager on CPU, sdpa on CUDA | packed_eager | eager | sdpa | flash_attention_2
    num_samples: int | None = None  # examples drawn from the mixture (default: what max_steps consumes)
    vqa_turns: int = 1  # up to this many QA pairs about one image per vqa example (multi-turn, shuffled order)
    # vqa_turns > 1 with packing: each turn sees the image and its own question only (`branch_turns`), as in a
    # single-turn example; false: an ordinary multi-turn conversation (earlier answers in context).
    vqa_branches: bool = True
    quantization: str | None = None  # null | "4bit": QLoRA, the base LLM loaded in 4-bit NF4 (needs `lora`)
    freeze_llm: bool = False  # align stage: only the rows `mllm init` added to the vocabulary train

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ValueError("the LLM recipe needs `data` and `out`")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"tasks: {unknown_name('task', task, TASKS)}")
        # Checked here, not by the Trainer after the model and data have loaded.
        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"lr_scheduler: {unknown_name('scheduler', self.lr_scheduler, schedulers)}")
        for question_type, weight in self.multi_types.items():
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"multi_types: the weight of {question_type} must be a number >= 0, got {weight!r}")
        if any(w < 0 for w in self.tasks.values()) or not any(
                weight > 0 for weight in (*self.tasks.values(), *self.multi_types.values())):
            raise ValueError(f"tasks: weights must be >= 0 with at least one positive (here or in multi_types), "
                             f"got {self.tasks}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        drops = (self.edit_drop_instruction, self.edit_drop_both)
        if not 0.0 <= self.edit_image_first <= 1.0:
            raise ValueError(f"edit_image_first must be in [0, 1], got {self.edit_image_first}")
        if self.edit_image_first_loss not in EDIT_IMAGE_FIRST_LOSSES:
            raise ValueError(f"edit_image_first_loss must be one of {EDIT_IMAGE_FIRST_LOSSES}, "
                             f"got {self.edit_image_first_loss!r}")
        if not (all(0.0 <= d <= 1.0 for d in drops) and sum(drops) <= 1.0):
            raise ValueError(f"edit_drop_instruction and edit_drop_both must be in [0, 1] with a sum <= 1, got {drops}")
        for operation, weight in self.edit_operations.items():
            if operation not in EDIT_OPERATIONS:
                raise ValueError(f"edit_operations: {unknown_name('edit operation', operation, EDIT_OPERATIONS)}")
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"edit_operations: the weight of {operation} must be a number >= 0, got {weight!r}")
        if not self.edit_changed_weight > 0:
            raise ValueError(f"edit_changed_weight must be > 0, got {self.edit_changed_weight}")
        if min(self.max_steps, self.per_device_batch_size, self.gradient_accumulation_steps) <= 0:
            raise ValueError("max_steps, per_device_batch_size and gradient_accumulation_steps must be positive")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if self.vqa_turns < 1:
            raise ValueError(f"vqa_turns must be at least 1, got {self.vqa_turns}")
        if self.quantization not in (None, "4bit"):
            raise ValueError(f"quantization must be null or '4bit', got {self.quantization!r}")
        if self.quantization == "4bit" and self.lora is None:
            raise ValueError("quantization: 4bit (QLoRA) needs a `lora` section: a 4-bit base cannot be fine-tuned "
                             "in full; set lora (e.g. `--set lora.r=16`) or quantization=null")
        if self.freeze_llm and (self.lora is not None or self.quantization is not None):
            raise ValueError("freeze_llm (the align stage) trains only the new vocabulary rows of a full-precision "
                             "LLM: set lora=null and quantization=null")
        if self.attn_implementation not in TRAIN_ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {TRAIN_ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.freeze_llm and self.weight_decay != 0:
            raise ValueError("freeze_llm needs weight_decay: 0 (decoupled weight decay would shrink the frozen "
                             f"vocabulary rows too), got {self.weight_decay}")


# ---------------------------------------------------------------------------------------- data
def load_task_pools(data: str, tasks: dict[str, float], vqa_turns: int = 1, seed: int = 0,
                    multi_types: dict[str, float] | None = None) -> dict[str, list]:
    """{task: [Sample, ...]} for the tasks with a positive weight, read once from the shards.

    `vqa_turns` > 1 groups each image's QA pairs into multi-turn vqa conversations (`group_vqa_turns`), and
    likewise the questions over one pair of images (task multi). Each type of `multi_types` with a positive
    weight also gets the pool `multi/<type>`: that type's two-image questions, one an example (`mixture_weights`).
    `split=False`: every process reads every shard; the Trainer's sampler splits the examples."""
    check_data_path(data)
    alone = [question_type for question_type, weight in (multi_types or {}).items() if weight > 0]
    wanted = tuple(task for task, weight in tasks.items() if weight > 0)
    read = wanted + (("multi",) if alone and "multi" not in wanted else ())
    stats = DataStats()
    pools: dict[str, list] = {task: [] for task in read}
    for record in read_records(data, stats=stats, split=False):
        for sample in record_samples(record, read, stats):
            pools[sample.task].append(sample)
    main = _is_main_process()  # every process reads the data; one says what it found
    if stats.total_skipped and main:
        print(f"skipped records: {stats.report()}")
    for question_type in alone:
        pool = [sample for sample in pools["multi"] if sample.question_type == question_type]
        if not pool:
            found = sorted({sample.question_type for sample in pools["multi"] if sample.question_type})
            raise ValueError(f"multi_types: {data} holds no two-image question of type {question_type!r} "
                             f"(its types: {', '.join(found) or 'none named'})")
        pools[f"multi/{question_type}"] = pool
    if "multi" not in wanted:
        pools.pop("multi", None)
    for task in BRANCHED_TASKS:
        if vqa_turns > 1 and pools.get(task):
            pools[task] = group_vqa_turns(pools[task], vqa_turns, seed, task)
    empty = [task for task, samples in pools.items() if not samples]
    pools = {task: samples for task, samples in pools.items() if samples}
    if not pools:
        raise ValueError(f"{data} holds no samples of the tasks {list(wanted)} (`mllm data shapes` writes caption, "
                         "vqa and t2i samples, `mllm data convert-llava` chat only: choose a recipe whose tasks "
                         "the data has, e.g. --recipe chat for conversations)")
    if empty and main:
        print(missing_tasks_note(data, empty, list(pools)))
    return pools


def missing_tasks_note(data: str, empty: list[str], kept: list[str]) -> str:
    """The one line that says which tasks of the mixture the data lacks and what the run trains on instead."""
    note = f"note: no {_listed(empty, 'or')} samples in {data}; training on {_listed(kept, 'and')} only"
    if kept == ["chat"]:
        note += " (recipe `chat` is made for conversation data)"
    return note


def _listed(words: list[str], conjunction: str) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def _cpu_fsdp_requested(state) -> bool:
    """True when `accelerate launch` with an FSDP config started several CPU processes: accelerate then
    sets up plain DDP (its state enables FSDP only for accelerator devices), although torch's FSDP2
    (`fully_shard`) shards over gloo on CPU."""
    from accelerate.utils import DistributedType

    return (state.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def _enable_cpu_fsdp(state) -> None:
    """Turn accelerate's CPU state to FSDP with the launcher's plugin settings (FSDP_* variables), so
    `accelerator.prepare` shards the model with `fully_shard` and checkpoints save and load sharded, as on
    GPUs. Only FSDP2 runs on CPU (FSDP1 needs a CUDA device)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
                         "(training/configs/accelerate/fsdp_cpu.yaml)")
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def _is_main_process() -> bool:
    """The process that prints what every process would (torchrun and accelerate set RANK; alone: 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def group_vqa_turns(samples: list, turns: int, seed: int, task: str = "vqa") -> list:
    """Single-turn vqa samples -> multi-turn ones: the QA pairs about one image (consecutive samples sharing
    a record key `{key}/vqa{i}`) in a seeded random order, cut into conversations of up to `turns` pairs.
    `task` "multi": the same for the questions over one record's images (`{key}/multi{i}`).

    The image comes once, in the first user turn; every answer is supervised. Many answers per image
    tokens make VQA training several times cheaper per token than one pair per example. `mllm train`
    (vqa_branches, packing) then makes each pair a branch off the image (`tokenize_examples`), so no answer
    is learned from the ones before it; otherwise the shuffled order at least keeps every question type in
    first position (the single-turn form the suites ask in)."""
    rng = random.Random(seed)
    grouped: list[Sample] = []
    records: dict[str, list] = {}
    for sample in samples:
        records.setdefault(sample.key.rsplit(f"/{task}", 1)[0], []).append(sample)
    for key, pairs in records.items():
        order = rng.sample(pairs, len(pairs))
        for start in range(0, len(order), turns):
            messages = []
            for index, pair in enumerate(order[start:start + turns]):
                user, assistant = pair.messages
                content = user["content"] if index == 0 else [p for p in user["content"] if p["type"] == "text"]
                messages += [{"role": "user", "content": content}, assistant]
            grouped.append(Sample(f"{key}/{task}-turns{start // turns}", task, messages))
    return grouped


def draw_conversations(pools: dict[str, list], tasks: dict[str, float], processor, cfg_dropout: float,
                       num_samples: int | None, seed: int,
                       edit_drops: tuple[float, float] = (0.0, 0.0),
                       edit_image_first: float = 0.0, edit_describe: bool = False,
                       edit_operations: dict[str, float] | None = None) -> list[tuple[str, list[dict]]]:
    """(task, messages) drawn from the mixture: each example picks a task with probability proportional to
    its weight, then that task's next sample (a seeded shuffle, reshuffled when exhausted). A fraction
    `cfg_dropout` of text-to-image examples has its prompt replaced by the unconditional one, so
    classifier-free guidance has an unconditional branch to subtract. `edit_drops` = (instruction, both):
    the fractions of edit examples whose user turn keeps the source image only, and whose user turn is the
    unconditional draw prompt (`processor.edit_conversation` builds the same branches); `edit_image_first`:
    the share of the other edit examples whose user turn puts the image before the instruction;
    `edit_describe` keeps an edit record's description of its result in the reply, before the image
    (false: image-only replies); `edit_operations` weights the edit samples by their operation (an edit example
    picks an operation with probability proportional to its weight times its number of samples, then that
    operation's next sample; unnamed operations weigh 1)."""
    rng = random.Random(seed)
    names = sorted(name for name in pools if tasks.get(name, 0) > 0)
    if not names:
        raise ValueError(f"none of the tasks {sorted(tasks)} with a positive weight has samples")
    weights = [tasks[name] for name in names]
    orders: dict[str, list[int]] = {name: [] for name in names}
    total = num_samples if num_samples is not None else sum(len(pools[name]) for name in names)
    by_operation = _operation_groups(pools.get("edit", []), edit_operations) if "edit" in names else None
    operation_orders: dict[str, list[int]] = {}
    drawn = []
    for _ in range(total):
        task = rng.choices(names, weights)[0]
        if task == "edit" and by_operation is not None:
            groups, group_weights = by_operation
            operation = rng.choices(list(groups), group_weights)[0]
            if not operation_orders.get(operation):
                operation_orders[operation] = rng.sample(groups[operation], len(groups[operation]))
            messages = pools[task][operation_orders[operation].pop()].messages
        else:
            if not orders[task]:
                orders[task] = rng.sample(range(len(pools[task])), len(pools[task]))
            messages = pools[task][orders[task].pop()].messages
        if task == "edit" and not edit_describe:
            messages = [message if message["role"] != "assistant" else
                        {**message, "content": [p for p in message["content"] if p["type"] == "image"]}
                        for message in messages]
        if task == "t2i" and rng.random() < cfg_dropout:
            reply = [message for message in messages if message["role"] == "assistant"]
            messages = processor.unconditional_draw_conversation() + reply
        elif task == "edit" and (coin := rng.random()) < sum(edit_drops):
            user = messages[0]
            # the reply's image only: a description of the result would not follow from what is left
            reply = [{"role": "assistant", "content": [p for p in message["content"] if p["type"] == "image"]}
                     for message in messages if message["role"] == "assistant"]
            if coin < edit_drops[0]:  # the instruction dropped: the source image alone
                messages = [{"role": "user", "content": [p for p in user["content"] if p["type"] == "image"]}, *reply]
            else:  # both dropped
                messages = processor.unconditional_draw_conversation() + reply
        elif task == "edit" and rng.random() < edit_image_first:
            user, *rest = messages
            messages = [{"role": "user", "content": list(reversed(user["content"]))}, *rest]
        drawn.append((task, messages))
    return drawn


def _operation_groups(samples: list, weights: dict[str, float] | None):
    """({operation: [index, ...]}, [weight x count, ...]) over the edit samples, for `draw_conversations`
    ("" groups the samples whose record names no operation); None without weights (edits drawn as one pool)."""
    if not weights:
        return None
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.operation or "", []).append(index)
    groups = dict(sorted(groups.items()))
    group_weights = [weights.get(operation, 1.0) * len(indices) for operation, indices in groups.items()]
    if not any(weight > 0 for weight in group_weights):
        raise ValueError(f"edit_operations {weights} leaves no edit sample to draw: give an operation of the data "
                         f"({', '.join(operation or 'unnamed' for operation in groups)}) a weight > 0")
    return groups, group_weights


def mixture_weights(cfg: LLMTrainConfig) -> dict[str, float]:
    """The weight of each pool of the mixture: the tasks', then `multi/<type>` for each of `multi_types`."""
    return {**cfg.tasks, **{f"multi/{question_type}": weight for question_type, weight in cfg.multi_types.items()}}


def examples_needed(cfg: LLMTrainConfig) -> int:
    """`num_samples`, or by default exactly what the run consumes: max_steps optimizer steps of
    per_device_batch_size x gradient_accumulation_steps examples on each of WORLD_SIZE processes (a mixture
    drawn larger would only be tokenized at setup and never trained on)."""
    if cfg.num_samples is not None:
        return cfg.num_samples
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg.max_steps * cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world


def draw_mixture(cfg: LLMTrainConfig, processor) -> tuple[list[tuple[str, list[dict]]], list[str]]:
    """The run's examples as (task, messages), drawn once with the recipe's seed, and the sorted task names
    (a task's index in it is the `task` of its examples)."""
    pools = load_task_pools(cfg.data, cfg.tasks, cfg.vqa_turns, cfg.seed, cfg.multi_types)
    drawn = draw_conversations(pools, mixture_weights(cfg), processor, cfg.cfg_dropout, examples_needed(cfg), cfg.seed,
                               (cfg.edit_drop_instruction, cfg.edit_drop_both), cfg.edit_image_first,
                               cfg.edit_describe, cfg.edit_operations)
    return drawn, sorted(pools)


def task_counts(drawn: list[tuple[str, list[dict]]], task_names: list[str]) -> dict[str, int]:
    return {task: sum(1 for t, _ in drawn if t == task) for task in task_names}


def tokenize_examples(processor, conversations: list[list[dict]], max_length: int | None,
                      branched: list[bool] | None = None) -> list[dict[str, list[int]]]:
    """Conversations -> [{"input_ids", "labels"}] (unpadded lists), truncated to `max_length`.

    A conversation flagged in `branched` (a multi-turn vqa example) becomes one tree-shaped example
    (`branch_turns`): each turn is tokenized as its own single-turn conversation about the image, and the
    shared prefix (the image) is kept once; such examples also carry "position_ids" and "branch_ids"."""
    flags = branched or [False] * len(conversations)
    flat, owners = [], []
    for index, (conversation, flag) in enumerate(zip(conversations, flags)):
        parts = split_turns(conversation) if flag else [conversation]
        flat += parts
        owners += [index] * len(parts)
    pieces: list[list[dict[str, list[int]]]] = [[] for _ in conversations]
    for start in range(0, len(flat), TOKENIZE_BATCH):
        batch = processor(flat[start:start + TOKENIZE_BATCH], padding_side="right",
                          max_length=max_length, truncation=True)
        for offset, (ids, mask, labels) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"])):
            length = int(mask.sum())
            pieces[owners[start + offset]].append({"input_ids": ids[:length].tolist(), "labels": labels[:length].tolist()})
    return [branch_turns(parts) if flag else parts[0] for parts, flag in zip(pieces, flags)]


def split_turns(conversation: list[dict]) -> list[list[dict]]:
    """A multi-turn conversation about the images of its first user turn -> one single-turn conversation per
    (user, assistant) pair, each with those images before its own text (the form the suites ask in)."""
    first = conversation[0]["content"]
    images = [part for part in first if part["type"] != "text"] if isinstance(first, list) else []
    turns = []
    for user, assistant in zip(conversation[0::2], conversation[1::2]):
        content = user["content"]
        text = [{"type": "text", "text": content}] if isinstance(content, str) else \
            [part for part in content if part["type"] == "text"]
        turns.append([{"role": "user", "content": images + text}, assistant])
    return turns


def branch_turns(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Tokenized single-turn examples that share a prefix (the image) -> one example: the longest common
    prefix once (branch 0), then each example's remainder (branch 1, 2, ...) with position_ids continuing
    from the prefix. With `mllm.attention`'s packed_eager attention a branch sees the prefix and itself
    only, so every turn trains exactly as if it were a single-turn example, while the image is run once.
    (Conversation history would otherwise teach answers from earlier answers instead of the image.)"""
    first = examples[0]["input_ids"]
    shared = min(len(e["input_ids"]) for e in examples) - 1  # every branch keeps at least one token
    for example in examples[1:]:
        ids = example["input_ids"]
        shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
    input_ids, labels = list(first[:shared]), list(examples[0]["labels"][:shared])
    position_ids, branch_ids = list(range(shared)), [0] * shared
    for branch, example in enumerate(examples, start=1):
        rest = len(example["input_ids"]) - shared
        input_ids += example["input_ids"][shared:]
        labels += example["labels"][shared:]
        position_ids += range(shared, shared + rest)
        branch_ids += [branch] * rest
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "branch_ids": branch_ids}


def image_first_edit(messages: list[dict]) -> bool:
    """Whether an edit conversation's user turn is the image, then the instruction (`edit_image_first`)."""
    content = messages[0]["content"]
    if isinstance(content, str) or len(content) < 2:
        return False
    kinds = [part["type"] for part in content]
    return kinds[0] == "image" and "text" in kinds


def cut_after_reply_start(example: dict[str, list[int]], boi_token_id: int) -> dict[str, list[int]]:
    """A tokenized example cut right after the first supervised `<|boi|>` (the reply's start of image): what is
    left trains the decision to draw, not the drawing (`edit_image_first_loss: start`). An example with no
    supervised `<|boi|>` is returned as it is."""
    ids, labels = example["input_ids"], example["labels"]
    for index, (token, label) in enumerate(zip(ids, labels)):
        if token == boi_token_id and label == boi_token_id:
            return {key: value[:index + 1] if isinstance(value, list) else value for key, value in example.items()}
    return example


def edit_loss_weights(example: dict[str, list[int]], vocab, weight: float) -> list[float] | None:
    """The per-token loss weights of a tokenized edit example, aligned with its labels: `weight` on each code
    of the reply's image (the last, supervised image) that differs from the code at the same grid position of
    the source image (the first image), 1 elsewhere. None when there is nothing to weight (weight 1, or no
    source image: the unconditional branch)."""
    if weight == 1.0:
        return None
    images = vocab.find_images(example["input_ids"])
    if len(images) < 2:
        return None
    (_, source), (start, target) = images[0], images[-1]
    if example["labels"][start + 1] == -100:  # the last image is not the reply's
        return None
    weights = [1.0] * len(example["input_ids"])
    for offset, changed in enumerate((target != source).reshape(-1).tolist()):
        if changed:
            weights[start + 1 + offset] = weight
    return weights


# ---------------------------------------------------------------------------------------- collators
class PaddingCollator:
    """Right-pads a list of examples to the longest; padding gets label -100 and attention 0."""

    def __init__(self, pad_token_id: int, ignore_index: int = -100) -> None:
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), longest), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BranchCollator:
    """The packing collator, plus tree-shaped examples (`branch_turns`): when any example carries
    "position_ids"/"branch_ids", the row gets those position_ids (the others count from 0) and a
    `branch_ids` row (0 elsewhere), which `packed_eager` attention reads."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        tree = any("branch_ids" in f for f in features)
        batch = self.inner([{k: v for k, v in f.items() if k not in ("position_ids", "branch_ids")} for f in features])
        if tree:
            kept = [f for f in features if len(f["input_ids"]) > 0]
            batch["position_ids"] = torch.tensor(
                [p for f in kept for p in f.get("position_ids", range(len(f["input_ids"])))])[None]
            batch["branch_ids"] = torch.tensor([b for f in kept for b in f.get("branch_ids", [0] * len(f["input_ids"]))])[None]
        return batch


def make_collator(packing: bool, pad_token_id: int):
    if packing:
        # One row (1, sum T_i) with position_ids restarting at 0 per example, and the examples' boundaries
        # (cu_seq_lens_q/k, as flash-attn's varlen kernel takes them): flash_attention_2 and `packed_eager`
        # attend within each example from the boundaries; sdpa/eager get a block-diagonal causal mask that
        # transformers derives from the position_ids. The first label of each example is -100 so no loss
        # crosses a boundary.
        return BranchCollator(
            DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True))
    return PaddingCollator(pad_token_id)


class TaskCollator:
    """Wraps a collator: examples may carry `task` (an index into the mixture's task names); the batch then
    also holds `task_ids`, shaped like `labels`, the task of each token (-1 on padding). Examples may carry
    `loss_weights` (one per token, `edit_loss_weights`); when any does, the batch holds `loss_weights` shaped
    like `labels` (1 for the tokens of examples without them). Packed rows concatenate examples in order,
    padded rows right-pad, so the per-token values follow the same layout."""

    def __init__(self, inner, packing: bool) -> None:
        self.inner, self.packing = inner, packing

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        extra = ("task", "loss_weights")
        batch = self.inner([{k: v for k, v in f.items() if k not in extra} for f in features])
        if features and "task" in features[0]:
            batch["task_ids"] = self._layout(batch["labels"], features, lambda f: [int(f["task"])] * len(f["input_ids"]), -1)
        if any(f.get("loss_weights") is not None for f in features):
            batch["loss_weights"] = self._layout(
                batch["labels"].float(), features,
                lambda f: f["loss_weights"] if f.get("loss_weights") is not None else [1.0] * len(f["input_ids"]), 1.0)
        return batch

    def _layout(self, like: torch.Tensor, features: list[dict], values, fill) -> torch.Tensor:
        """A tensor shaped like `like` holding each example's per-token `values(feature)` where its tokens lie."""
        out = torch.full_like(like, fill)
        if self.packing:
            start = 0
            for feature in (f for f in features if len(f["input_ids"]) > 0):
                n = len(feature["input_ids"])
                out[0, start:start + n] = torch.tensor(values(feature), dtype=out.dtype)
                start += n
        else:
            for row, feature in enumerate(features):
                n = len(feature["input_ids"])
                out[row, :n] = torch.tensor(values(feature), dtype=out.dtype)
        return out


# ---------------------------------------------------------------------------------------- attention
def set_training_attention(llm, requested: str = "auto", tree: bool = False) -> str:
    """Select the LLM's attention for training, and turn its KV cache off; returns the attention's name.

    "auto": `packed_eager` (mllm.attention: per-example eager attention, the fastest on CPU, packed or not)
    off CUDA, sdpa on CUDA, and packed_eager everywhere when `tree` (tree-shaped examples, `branch_turns`:
    only packed_eager reads their branch_ids). `llm` is a transformers model (not a peft wrapper). Without
    a KV cache: transformers builds the block-diagonal mask of a packed row from its position_ids only when
    no cache is passed (masking_utils), and training needs none anyway. `restore_inference_attention`
    undoes both before saving."""
    name = requested
    if requested == "auto":
        name = "sdpa" if llm.device.type == "cuda" and not tree else "packed_eager"
    elif tree and name != "packed_eager":
        raise ValueError(f"attn_implementation {name!r} cannot train branched vqa examples (vqa_turns > 1 with "
                         "vqa_branches and packing): use auto or packed_eager, or set vqa_branches: false")
    if name == "packed_eager":
        register_packed_eager()
    llm.set_attn_implementation(name)
    llm.config.use_cache = False
    return name


def restore_inference_attention(llm) -> None:
    """sdpa (`UnifiedMLLM.from_pretrained`'s default) and the KV cache generation wants, on the transformers
    model under a peft wrapper, if any."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base.config.use_cache = True
    if base.config._attn_implementation not in ("sdpa", "flash_attention_2"):
        base.set_attn_implementation("sdpa")


# ---------------------------------------------------------------------------------------- trainer
class TaskLossTrainer(Trainer):
    """A `Trainer` whose compute_loss takes the per-token cross-entropy once: the training loss is its
    token mean (normalized exactly as transformers' causal-LM loss: over `num_items_in_batch` when the
    Trainer counts it, for gradient accumulation and multi-process token averaging), and the same
    per-token losses, summed per task, feed `loss_<task>` / `label_tokens_<task>` (supervised tokens) in the
    logs (token-weighted over the logging window, summed over processes)."""

    def __init__(self, *args, task_names: list[str] = (), fsdp_refusal: str | None = None, **kwargs) -> None:
        self.fsdp_refusal = fsdp_refusal  # read while the base class sets up accelerate, so set first
        super().__init__(*args, **kwargs)
        self.task_names = list(task_names)
        self.task_sums: torch.Tensor | None = None  # (2, num_tasks): loss sum, token count since the last log
        self.loss_is_scaled_for_ga = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if _cpu_fsdp_requested(self.accelerator.state):
            _enable_cpu_fsdp(self.accelerator.state)
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled and self.fsdp_refusal:
            raise ValueError(f"{self.fsdp_refusal}; launch it with torchrun or `accelerate launch` without an FSDP "
                             "config (each process holds the whole model)")

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (trainer_state.json written last marks it complete), made durable (every file
        and the folder fsynced) before older checkpoints are rotated away, so a power loss never leaves only a
        checkpoint that is not on disk yet."""
        limit = self.args.save_total_limit
        if _rotate_checkpoints is not None:
            self.args.save_total_limit = None  # rotated below, once the new checkpoint is durable
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if folder.is_dir():
            fsync_tree(folder)
            fsync_path(run_dir)
        if _rotate_checkpoints is not None:
            _rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids", None)
        loss_weights = inputs.pop("loss_weights", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = self.language_model_loss(logits, labels, task_ids, num_items_in_batch, model.training, loss_weights)
        if isinstance(outputs, dict):
            outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def language_model_loss(self, logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor | None,
                            num_items_in_batch=None, training: bool = True,
                            loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy of logits (B, T, V) against labels (B, T) (-100: not supervised), each
        token's term times its `loss_weights` (B, T) when given (the normalisation stays the token count);
        accumulates the per-task sums of the unweighted terms for the logs when `task_ids` (B, T) are given in
        training."""
        targets = labels[:, 1:].to(logits.device)  # position t predicts label t+1
        valid = targets != -100  # (B, T-1): supervised positions (assistant tokens)
        # Cross-entropy in float32 on the supervised positions only: the LM head still runs on every
        # position (its FLOPs are spent either way), but the float copy and log-softmax of (B, T, V)
        # logits shrink to the labelled rows (the answer text, or an image's codes).
        per_token = F.cross_entropy(logits[:, :-1][valid].float(), targets[valid], reduction="none")  # (N,)
        weighted = per_token if loss_weights is None else per_token * loss_weights[:, 1:].to(per_token.device)[valid]
        if num_items_in_batch is not None:
            loss = weighted.sum() / torch.as_tensor(num_items_in_batch, device=per_token.device)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            self.loss_is_scaled_for_ga = True
        else:
            loss = weighted.sum() / max(weighted.numel(), 1)
            self.loss_is_scaled_for_ga = False
        if task_ids is not None and self.task_names and training:
            tasks = task_ids[:, 1:].to(per_token.device)[valid]  # (N,)
            keep = tasks >= 0
            sums = torch.zeros(2, len(self.task_names), dtype=torch.float64, device=per_token.device)
            sums[0].index_add_(0, tasks[keep], per_token.detach()[keep].double())
            sums[1].index_add_(0, tasks[keep], torch.ones_like(per_token[keep], dtype=torch.float64))
            self.task_sums = sums if self.task_sums is None else self.task_sums + sums.to(self.task_sums.device)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.task_names:
            sums = self.task_sums
            if sums is None:
                sums = torch.zeros(2, len(self.task_names), dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:  # every process logs (Trainer gathers the loss the same way)
                sums = sums.to(self.args.device)
                dist.all_reduce(sums)
            for index, name in enumerate(self.task_names):
                count = float(sums[1, index])
                if count > 0:
                    logs[f"loss_{name}"] = float(sums[0, index]) / count
                    logs[f"label_tokens_{name}"] = int(count)
            self.task_sums = None
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------- callbacks
class MetricsLogger(TrainerCallback):
    """Appends {step, loss, loss_<task>, label_tokens_<task>, learning_rate, tokens_per_s} to `metrics_file`
    at every logged step (the per-task losses are token-weighted means over the logging window). Tokens
    are the Trainer's `num_input_tokens_seen`."""

    def __init__(self, metrics_file: Path) -> None:
        self.metrics_file = metrics_file
        self.last_time, self.last_tokens = time.time(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now, tokens = time.time(), state.num_input_tokens_seen
        record = {"step": state.global_step, "loss": float(logs["loss"]),
                  **{k: v for k, v in logs.items() if k.startswith(("loss_", "label_tokens_", "tokenizer_"))},
                  "learning_rate": float(logs.get("learning_rate", float("nan"))),
                  "tokens_per_s": (tokens - self.last_tokens) / max(now - self.last_time, 1e-6)}
        self.last_time, self.last_tokens = now, tokens
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN/inf logged loss stops the run before anything else is saved; the last checkpoint (written
    before the loss diverged) stays the one to resume from (`raise_if_stopped_on_nan` says so)."""

    def __init__(self) -> None:
        self.bad: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad = (state.global_step, loss)
            control.should_training_stop = True
            control.should_save = False
        return control


def raise_if_stopped_on_nan(nan_guard: StopOnNonFiniteLoss, out: Path) -> None:
    """After `trainer.train()`: a clear error naming the last good checkpoint when the NaN guard fired."""
    if nan_guard.bad is None:
        return
    step, loss = nan_guard.bad
    complete = complete_checkpoints(out)
    last = complete[-1][1] if complete else None
    raise RuntimeError(
        f"loss became {loss} at step {step}; training stopped. "
        + (f"The last good checkpoint is {last}: lower learning_rate and rerun with --resume."
           if last else "No checkpoint was written before it: lower learning_rate and rerun.")
    )


# ---------------------------------------------------------------------------------------- runs
def train(trainer_class: type[TaskLossTrainer], cfg: LLMTrainConfig, out: Path, resume: bool, precision: str,
          device: str, arguments: dict | None = None, **trainer_kwargs) -> TaskLossTrainer:
    """Build the recipe's trainer (`training_arguments` with `arguments` on top; OUT/metrics.jsonl and the NaN
    guard as callbacks), train it from the checkpoint to resume, if any (`resume_checkpoint`), and raise if
    the loss went NaN or inf. Returns the trainer; its model is the trained one."""
    nan_guard = StopOnNonFiniteLoss()
    trainer = trainer_class(args=training_arguments(cfg, out, precision, device, **(arguments or {})),
                            callbacks=[MetricsLogger(out / METRICS_NAME), nan_guard], **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume_checkpoint(out, resume))
    raise_if_stopped_on_nan(nan_guard, out)
    return trainer


def start_run(cfg: LLMTrainConfig, final: Path) -> tuple[str, str] | None:
    """The first step of an LLM recipe: None when `final` (written only when a run completes) exists
    already; otherwise (device, precision), with every RNG seeded from `cfg.seed` before any model is
    built, so the run's random draws repeat exactly."""
    keep_freed_memory()  # ~15% more tokens/s on CPU (see mllm.runtime)
    if not cfg.model:
        raise ValueError("the LLM recipe needs `model` (a model folder from `mllm init` or an earlier stage)")
    check_data_path(cfg.data)  # a wrong --data fails now, not after the model has loaded
    if _is_main_process():  # one process cleans up; the others only look
        recover_dir(final)  # a final save cut short by a kill: its previous copy back, its partial copy gone
    if final.is_dir():
        print(f"already trained: {final} (delete it to retrain)")
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    return device, precision


def write_recipe(cfg, out: Path) -> None:
    """OUT/train_recipe.yaml: the config the run trains with (`--recipe OUT/train_recipe.yaml` reruns it).
    Written by the main process only: every process has the same config, and two writers of one file race
    (each writes a temp file and renames it into place)."""
    out.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        save_config(cfg, out / RECIPE_NAME)


def save_adapter(llm, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A peft model's adapter (adapter_config.json + adapter_model.safetensors) written atomically to `folder`
    (`mllm.io.write_dir`: beside it, fsynced, renamed into place). `state_dict`: the full weights when the
    module holds only this process's shard (FSDP)."""
    return write_dir(folder, lambda tmp: llm.save_pretrained(tmp, state_dict=state_dict))


def full_state_dict(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """The trained model's full weights (on CPU, in the main process) when the Trainer sharded it with
    FSDP, else None (the module in memory is whole). Every process must call it: the shards are gathered
    collectively."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # torch's own gather: accelerate's get_state_dict returns the shards as they are under the configs'
    # SHARDED_STATE_DICT, which suits checkpoints, not a model folder
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def freeze_all_but_new_rows(model) -> list[int]:
    """Freeze the LLM except the rows of the input embedding (and of an untied LM head) that `mllm init`
    added (`mllm.lora.new_token_ids`): those matrices keep requires_grad, and a gradient hook zeroes every
    other row, so with no weight decay the optimizer (AdamW: zero gradient -> zero moments -> zero update)
    leaves them bit-identical. Returns the trainable ids. The hook is on the parameter itself: single
    process or DDP (torchrun); FSDP and DeepSpeed flatten parameters and would bypass it."""
    ids = new_token_ids(model)
    llm = model.llm
    llm.requires_grad_(False)
    model.vision_tokenizer.requires_grad_(False)
    if model.projector is not None:
        model.projector.requires_grad_(False)
    matrices = {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings())
                if m is not None}  # one entry for a tied head
    for weight in matrices.values():
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[[i for i in ids if i < weight.shape[0]]] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
    return ids


def training_arguments(cfg: LLMTrainConfig, out: Path, precision: str, device: str, **overrides) -> TrainingArguments:
    """The recipe's `TrainingArguments` (shared by every LLM recipe, ETT included)."""
    values = {
        "output_dir": str(out),
        "per_device_train_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "logging_nan_inf_filter": False,  # a NaN must reach the callback, not be averaged away
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": precision == "bf16",
        "use_cpu": device == "cpu",
        "report_to": "none",
        "remove_unused_columns": False,
        "include_num_input_tokens_seen": True,
        "dataloader_num_workers": 0,
        # torchrun on CPU: gloo (set only when launched distributed; a lone process needs no backend)
        "ddp_backend": "gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every OUT/checkpoint-N holding a readable trainer_state.json, oldest first. The Trainer
    writes that file last, so a checkpoint cut short by a kill (SIGKILL, power loss) lacks it, or holds it
    cut short, and is passed over."""
    found = []
    for folder in out.glob("checkpoint-*") if out.is_dir() else []:
        suffix = folder.name.removeprefix("checkpoint-")
        if suffix.isdigit() and folder.is_dir() and _readable_json(folder / "trainer_state.json"):
            found.append((int(suffix), folder))
    return sorted(found)


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def resume_checkpoint(out: Path, resume: bool) -> str | None:
    """The checkpoint `trainer.train` resumes from: the latest complete one under OUT when `resume`.

    Resuming drops the lines of OUT/metrics.jsonl logged after that checkpoint (the killed run got further
    than its last checkpoint; those steps are trained again), so the log reads as one uninterrupted run.
    Without `resume`, an OUT that already holds checkpoints is refused rather than overwritten."""
    checkpoints = complete_checkpoints(out)
    partial = sorted(str(f) for f in out.glob("checkpoint-*") if f.is_dir()) if out.is_dir() else []
    if not resume:
        if checkpoints or partial:
            raise FileExistsError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                                  "or choose another --out (or delete them) to start over")
        return None
    for folder in sorted(set(partial) - {str(f) for _, f in checkpoints}):
        print(f"skipping {folder}: incomplete (the run was killed while writing it)")
    if not checkpoints:
        print(f"no complete checkpoint under {out}; starting from scratch")
        truncate_metrics(out / METRICS_NAME, 0)
        return None
    step, folder = checkpoints[-1]
    print(f"resuming from {folder}")
    truncate_metrics(out / METRICS_NAME, step)
    return str(folder)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of a metrics.jsonl up to `last_step` (rewritten atomically). A line that does not parse,
    such as a last line the kill cut short, is dropped with a note instead of stopping the resume. The main
    process rewrites it (it alone logs there); two writers would race on the temp file."""
    if not _is_main_process() or not path.is_file():
        return
    dropped = rewrite_jsonl(path, lambda record: record.get("step", 0) <= last_step)
    if dropped:
        print(f"dropped {len(dropped)} unreadable line(s) of {path} (line {', '.join(map(str, dropped))}: "
              "a write cut short by the kill)")


__all__ = [
    "ADAPTER_DIR",
    "METRICS_NAME",
    "MODEL_DIR",
    "RECIPE_NAME",
    "TRAIN_ATTN_IMPLEMENTATIONS",
    "BranchCollator",
    "LLMTrainConfig",
    "MetricsLogger",
    "PaddingCollator",
    "StopOnNonFiniteLoss",
    "TaskCollator",
    "TaskLossTrainer",
    "branch_turns",
    "complete_checkpoints",
    "cut_after_reply_start",
    "draw_conversations",
    "draw_mixture",
    "edit_loss_weights",
    "examples_needed",
    "freeze_all_but_new_rows",
    "group_vqa_turns",
    "image_first_edit",
    "load_task_pools",
    "make_collator",
    "missing_tasks_note",
    "raise_if_stopped_on_nan",
    "restore_inference_attention",
    "resume_checkpoint",
    "save_adapter",
    "set_training_attention",
    "split_turns",
    "start_run",
    "task_counts",
    "tokenize_examples",
    "train",
    "training_arguments",
    "truncate_metrics",
    "write_recipe",
]
