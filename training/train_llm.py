"""Recipe: train the unified model's LLM on a task mixture (align, pretrain, sft; LoRA, QLoRA or full).

    mllm train --recipe shapes-pretrain --model runs/demo/model --data runs/demo/data/train \
        --out runs/demo/pretrain [--set learning_rate=1e-4 lora.r=8] [--max-steps N] [--resume]

setup (shards -> task mixture drawn once with a seeded RNG -> processor -> a map-style dataset of
input_ids/labels; model; LoRA or full) -> train (transformers `Trainer`: bf16 autocast where
supported, cosine schedule, periodic checkpoints under OUT/checkpoint-N, `--resume`) -> save
(OUT/adapter for a LoRA run, OUT/model for a full run). Loss is on assistant tokens only (the
processor's labels). A fraction `cfg_dropout` of text-to-image examples has its prompt replaced by
`processor.unconditional_draw_conversation()`, so classifier-free guidance has an unconditional branch
to subtract. Every logged step appends a JSON line to OUT/metrics.jsonl.

Only the LLM trains: the visual tokenizer stays frozen (pre-tokenized shards skip it entirely). A
codebook-mode model (image embeddings projected from the tokenizer's codebooks) is trained by the ETT
recipe instead (training.train_ett: the LLM's loss also tunes the tokenizer).
Variants: `quantization: 4bit` loads the base LLM in 4-bit NF4 (`mllm.lora.load_base_4bit`, needs
bitsandbytes) and trains a LoRA on it (QLoRA); `freeze_llm: true` (the align stage) freezes the whole LLM
except the vocabulary rows `mllm init` added (`mllm.lora.new_token_ids`; input embedding and LM head), by
masking the gradient of every other row, and saves OUT/model.

The parts (data, collators, trainer, callbacks, checkpoints) are training.components.
"""

from __future__ import annotations

from pathlib import Path

from mllm.lora import add_lora, load_base_4bit
from mllm.model import UnifiedMLLM
from training import components
from training.components import ADAPTER_DIR, MODEL_DIR, LLMTrainConfig


def main(cfg: LLMTrainConfig, resume: bool = False) -> Path:
    # --- setup
    out = Path(cfg.out)
    final = out / (ADAPTER_DIR if cfg.lora is not None else MODEL_DIR)
    started = components.start_run(cfg, final)
    if started is None:
        return final
    device, precision = started
    if cfg.quantization == "4bit":
        model = load_base_4bit(cfg.model)  # frozen NF4 base, norms and head in fp32, gradient checkpointing
    else:
        model = UnifiedMLLM.from_pretrained(cfg.model, device="cpu", dtype="fp32")
    if model.config.embedding_mode != "learned":
        raise ValueError(
            f"{cfg.model} is a codebook-mode model (image embeddings projected from the tokenizer's codebooks); "
            "train it with an ETT recipe (`--recipe shapes-ett` or `--recipe ett`, or a YAML with `recipe: ett`; "
            "`--set ett.train_tokenizer=false` for a frozen tokenizer), or bake it first "
            "(`UnifiedMLLM.bake()` + save_pretrained)."
        )
    model.vision_tokenizer.requires_grad_(False)
    tree = cfg.vqa_turns > 1 and cfg.vqa_branches and cfg.packing
    attention = components.set_training_attention(model.llm, cfg.attn_implementation, tree)
    drawn, task_names = components.draw_mixture(cfg, model.processor)
    examples = components.tokenize_examples(model.processor, [messages for _, messages in drawn], cfg.max_length,
                                            [tree and task in components.BRANCHED_TASKS for task, _ in drawn])
    for index, (task, messages) in enumerate(drawn):
        if (task == "edit" and cfg.edit_image_first_loss == "start"
                and components.image_first_edit(messages)):
            examples[index] = components.cut_after_reply_start(examples[index], model.config.boi_token_id)
    for example, (task, _) in zip(examples, drawn):
        example["task"] = task_names.index(task)
        if task == "edit":
            example["loss_weights"] = components.edit_loss_weights(example, model.vocab, cfg.edit_changed_weight)
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
    mode = ("QLoRA" if cfg.quantization else "LoRA") if cfg.lora is not None else "full"
    if cfg.lora is None and cfg.freeze_llm:
        rows = components.freeze_all_but_new_rows(model)
        mode = f"of which only the {len(rows)} new vocabulary rows move"
    tokens = sum(len(example["input_ids"]) for example in examples)
    trainable = model.num_parameters(only_trainable=True) / 1e6
    print(f"llm: {trainable:.2f}M trainable parameters ({mode}), {len(examples)} examples "
          f"{components.task_counts(drawn, task_names)}, {tokens} tokens, {precision} on {device}, "
          f"{attention} attention")
    components.write_recipe(cfg, out)

    # --- train
    collator = components.make_collator(cfg.packing, model.config.pad_token_id)
    trainer = components.train(
        components.TaskLossTrainer, cfg, out, resume, precision, device,
        model=model.llm,  # learned mode: the plain HF causal LM (or its peft wrapper) is the whole model
        train_dataset=examples,
        data_collator=components.TaskCollator(collator, cfg.packing),
        task_names=task_names,
        fsdp_refusal=("QLoRA (quantization: 4bit) does not run sharded" if cfg.quantization else
                      "freeze_llm masks the gradients of whole embedding matrices, which FSDP shards"
                      if cfg.lora is None and cfg.freeze_llm else None),
    )

    # --- save (atomically, by the main process: a kill never leaves a half-written `final`, which marks a
    # finished run)
    model.llm = trainer.model
    components.restore_inference_attention(model.llm)
    weights = components.full_state_dict(trainer)  # FSDP: the shards gathered (every process takes part)
    if trainer.is_world_process_zero():
        if cfg.lora is not None:
            components.save_adapter(model.llm, final, weights)  # adapter_config.json + adapter_model.safetensors
        else:
            model.save_pretrained(final, llm_state_dict=weights)
        print(f"saved {final}")
    return final


__all__ = ["main"]
