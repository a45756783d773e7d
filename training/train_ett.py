"""Recipe: ETT, end-to-end tokenizer tuning of a codebook-mode model (the LLM's loss reaches the tokenizer).

    mllm train --recipe ett --model runs/ett/model --data runs/demo/data/train --out runs/ett/stage \
        [--set ett.reconstruction_weight=1.0 ett.tokenizer_learning_rate=1e-4 lora=null] [--resume]

`mllm train` runs an ETT recipe (`ETTTrainConfig`: an LLM recipe plus its `ett` section, `ETTSettings`)
with this module. The model must be in `codebook` mode (`mllm init --embedding codebook`): the input
embedding of image code k is `projector(concat(sem_codebook[k], pix_codebook[k]))`.

One step, for a batch of conversations with their images (`EndToEndModel.forward`):

    images (N, 3, S, S) --vision tokenizer (train mode, codebook_update="loss")--> codes (N, h, w),
        straight-through features (N, h, w, d_sem + d_pix), the tokenizer's own loss
        (pixel L1 + L2 reconstruction, VQ codebook + commitment, semantic distillation)
    conversations with those codes --processor--> input_ids / labels, packed like `mllm train`
    LLM(inputs_embeds: text rows, and projector(features) at the image positions) --> logits
    loss = LLM loss (assistant tokens) + reconstruction_weight * tokenizer loss

The features equal the codebook rows in value but carry gradients into the encoders (straight-through)
and the codebooks, so the LLM's loss on a caption or an answer moves the tokenizer towards codes the
LLM can read, while the reconstruction term keeps the pixel decoder faithful to them. Trainable: the LLM
(full, or LoRA with `lora`), the projector, and (`train_tokenizer: true`) the tokenizer's encoders,
codebooks and decoders, which get their own learning rate. The frozen teacher, LPIPS and a GAN
discriminator never train (the adversarial term is left out). The codes of every image are computed
afresh at every step, so ETT reads image shards, not `mllm pretokenize`d ones. Dead-code restarts are
off: a restarted code would jump to a new embedding under the LLM's feet.

`train_tokenizer: false` keeps the tokenizer frozen (images encoded without gradients): the codebook-mode
baseline at the same code count and budget, where only the LLM and the projector learn.

Output: OUT/model, a full model folder (the tuned tokenizer included), baked by default (image rows =
projector(codebooks) written into the LLM's embedding; learned mode), so it loads and serves like any
other model folder; `bake: false` keeps codebook mode (projector.safetensors) for more ETT. A LoRA run
also leaves the LLM's adapter at OUT/adapter; it does not carry the tuned tokenizer or projector, so
OUT/model (the adapter merged) is the result to use. Checkpoints, `--resume`, metrics.jsonl (with
`loss_llm`, `tokenizer_loss` and each tokenizer term), the NaN guard and the task mixture are those of
the LLM recipe (training.components).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from mllm.config import VISION_TOKENIZER_DIR
from mllm.lora import add_lora
from mllm.model import UnifiedMLLM
from tokenizer_vision import DualCodebookTokenizer
from training import components
from training.components import ADAPTER_DIR, MODEL_DIR, LLMTrainConfig, TaskLossTrainer

TOKENIZER_PARTS = ("pixel_encoder", "semantic_encoder", "local_encoder", "quantizer", "pixel_decoder", "semantic_decoder")


@dataclass
class ETTSettings:
    """The `ett` section of an ETT recipe."""

    reconstruction_weight: float = 1.0  # lambda: weight of the tokenizer's own loss next to the LLM loss
    tokenizer_learning_rate: float = 1e-4  # encoders, codebooks and decoders (the LLM and projector: learning_rate)
    train_tokenizer: bool = True  # false: a frozen tokenizer (the codebook-mode baseline)
    bake: bool = True  # save OUT/model in learned mode (image rows written into the LLM's embedding)

    def __post_init__(self) -> None:
        if self.reconstruction_weight < 0 or self.tokenizer_learning_rate < 0:
            raise ValueError("ett: reconstruction_weight and tokenizer_learning_rate must be >= 0")


@dataclass
class ETTTrainConfig(LLMTrainConfig):
    """An ETT recipe: an LLM recipe whose model is in codebook mode, plus how the tokenizer trains."""

    recipe_kind: ClassVar[str] = "ett"

    ett: ETTSettings = field(default_factory=ETTSettings)

    def validate(self) -> None:
        super().validate()
        if self.quantization is not None:
            raise ValueError("ett trains a full-precision LLM (full or LoRA) with the tokenizer: set "
                             "quantization=null")
        if self.edit_image_first_loss != "all":
            # ETT tokenizes each batch's conversations as it trains them (ETTCollator), where no example is cut
            raise ValueError("ett trains every example's whole reply: set edit_image_first_loss=all (\"start\" is "
                             "for `recipe: llm`)")


def bind_codes(conversations: list[list[dict]], codes: torch.Tensor) -> list[list[dict]]:
    """Replace the image parts of the conversations, in order, by `{"type": "image", "codes": codes[j]}`."""
    images = iter(codes)
    return [
        [{**message, "content": [{"type": "image", "codes": next(images)} if part["type"] == "image" else part
                                 for part in message["content"]]}
         for message in conversation]
        for conversation in conversations
    ]


class ETTCollator:
    """Examples {"messages", "task"} -> {"pixel_values" (N, 3, S, S): every image of the batch, in
    conversation order; "conversations"; "tasks" (B,)}. Tokenizing waits for the forward pass, where the
    codes come from the tokenizer being trained."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        conversations = [feature["messages"] for feature in features]
        parts = [part for conversation in conversations for message in conversation
                 for part in message["content"] if part["type"] == "image"]
        if any(part.get("image") is None for part in parts):
            raise ValueError("ETT needs image shards: these samples carry pre-tokenized codes, which cannot "
                             "follow a tokenizer that is being trained (pass the shards `mllm pretokenize` read)")
        images = [part["image"] for part in parts]
        pixel_values = (self.image_processor.preprocess(images) if images
                        else torch.zeros(0, 3, self.image_processor.image_size, self.image_processor.image_size))
        return {"pixel_values": pixel_values, "conversations": conversations,
                "tasks": torch.tensor([int(feature["task"]) for feature in features])}


class EndToEndModel(nn.Module):
    """The unified model plus the per-step tokenization of ETT, as one module (what the Trainer, and DDP,
    wrap). `forward` returns logits, labels, per-token task ids, the tokenizer's loss and the token count."""

    def __init__(self, mllm, settings: ETTSettings, packing: bool, max_length: int | None) -> None:
        super().__init__()
        self.mllm = mllm
        self.settings = settings
        self.max_length = max_length
        collator = components.make_collator(packing, mllm.config.pad_token_id)
        self.collate = components.TaskCollator(collator, packing)

    def train(self, mode: bool = True) -> EndToEndModel:
        super().train(mode)  # the LLM and the projector (UnifiedMLLM.train leaves the tokenizer alone)
        self.mllm.vision_tokenizer.train(mode and self.settings.train_tokenizer)
        return self

    def forward(self, pixel_values: torch.Tensor, conversations: list[list[dict]], tasks: torch.Tensor):
        mllm, tokenizer = self.mllm, self.mllm.vision_tokenizer
        features = tokenizer_loss = None
        losses: dict[str, torch.Tensor] = {}
        if pixel_values.shape[0] == 0:
            codes = torch.zeros(0, *tokenizer.grid_size, dtype=torch.long)
        elif self.settings.train_tokenizer:
            out = tokenizer(pixel_values, adversarial=False)
            codes, tokenizer_loss, losses = out["indices"], out["loss"], out["losses"]
            parts = [out[key] for key in ("quantized_sem", "quantized_pix") if out[key] is not None]
            features = torch.cat(parts, dim=-1).flatten(1, 2)  # (N, h*w, d): codebook rows, straight-through
        else:
            with torch.no_grad():
                codes = tokenizer.encode(pixel_values)
        batch = mllm.processor(bind_codes(conversations, codes), padding_side="right",
                               max_length=self.max_length, truncation=True)
        examples = []
        for ids, mask, labels, task in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], tasks):
            length = int(mask.sum())
            examples.append({"input_ids": ids[:length].tolist(), "labels": labels[:length].tolist(), "task": int(task)})
        image_features = None
        if features is not None:
            # The rows of the image positions in row-major order of the (packed or padded) batch: each
            # example's images in order, cut where truncation dropped its last images (never half of one).
            rows, start = [], 0
            for example, conversation in zip(examples, conversations):
                count = sum(part["type"] == "image" for message in conversation for part in message["content"])
                positions = int(mllm.vocab.is_image_id(torch.tensor(example["input_ids"])).sum())
                rows.append(features[start:start + count].reshape(-1, features.shape[-1])[:positions])
                start += count
            image_features = torch.cat(rows)
        device = mllm.device
        collated = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                    for key, value in self.collate(examples).items()}
        labels, task_ids = collated.pop("labels"), collated.pop("task_ids")
        outputs = mllm(**collated, image_features=image_features)
        return {"logits": outputs.logits, "labels": labels, "task_ids": task_ids, "tokenizer_loss": tokenizer_loss,
                "tokenizer_losses": losses, "tokens": sum(len(example["input_ids"]) for example in examples)}


class ETTTrainer(TaskLossTrainer):
    """The LLM recipe's trainer with loss = LLM loss + reconstruction_weight * tokenizer loss, two
    learning rates (LLM + projector; tokenizer), and the tokenizer's terms in the logs. Tokenizing happens
    in the model's forward, so the trainer counts the tokens seen from its outputs."""

    def __init__(self, *args, settings: ETTSettings, param_groups: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings, self.param_groups = settings, param_groups
        self.ett_sums: dict[str, float] = {}  # since the last log
        self.ett_steps = 0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.param_groups, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        llm_loss = self.language_model_loss(outputs["logits"], outputs["labels"], outputs["task_ids"],
                                            None, model.training)
        loss = llm_loss
        if outputs["tokenizer_loss"] is not None:
            loss = loss + self.settings.reconstruction_weight * outputs["tokenizer_loss"]
        if model.training:
            self.state.num_input_tokens_seen += outputs["tokens"] * self.args.world_size
            values = {"loss_llm": llm_loss, "tokenizer_loss": outputs["tokenizer_loss"],
                      **{f"tokenizer_{name}": value for name, value in outputs["tokenizer_losses"].items()}}
            for name, value in values.items():
                if value is not None:
                    self.ett_sums[name] = self.ett_sums.get(name, 0.0) + float(value.detach())
            self.ett_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.ett_steps:
            names = sorted(self.ett_sums)
            means = torch.tensor([self.ett_sums[name] / self.ett_steps for name in names], dtype=torch.float64)
            if self.args.world_size > 1:
                means = means.to(self.args.device)
                dist.all_reduce(means)
                means = means / self.args.world_size
            logs.update({name: float(value) for name, value in zip(names, means.tolist())})
            self.ett_sums, self.ett_steps = {}, 0
        super().log(logs, start_time)


def main(cfg: ETTTrainConfig, resume: bool = False) -> Path:
    # --- setup
    settings = cfg.ett
    out = Path(cfg.out)
    final = out / MODEL_DIR
    started = components.start_run(cfg, final)
    if started is None:
        return final
    device, precision = started
    tokenizer = DualCodebookTokenizer.from_pretrained(Path(cfg.model) / VISION_TOKENIZER_DIR,
                                                      codebook_update="loss", restart_every=0)
    model = UnifiedMLLM.from_pretrained(cfg.model, device="cpu", dtype="fp32", vision_tokenizer=tokenizer)
    if model.config.embedding_mode != "codebook":
        raise ValueError(f"{cfg.model} is a learned-mode model: ETT needs a codebook-mode model, whose image "
                         "embeddings are projected from the tokenizer's codebooks (`mllm init --embedding codebook`)")
    attention = components.set_training_attention(model.llm, cfg.attn_implementation)
    drawn, task_names = components.draw_mixture(cfg, model.processor)
    examples = [{"messages": messages, "task": task_names.index(task)} for task, messages in drawn]
    ETTCollator(tokenizer.processor)(examples[:1])  # pre-tokenized shards fail here, before any training

    if cfg.lora is not None:
        add_lora(model, cfg.lora)  # freezes the tokenizer and projector: re-enabled below
    elif cfg.freeze_llm:
        components.freeze_all_but_new_rows(model)
    model.vision_tokenizer.requires_grad_(False)
    if settings.train_tokenizer:
        for name in TOKENIZER_PARTS:
            part = getattr(model.vision_tokenizer, name)
            if part is not None:
                part.requires_grad_(True)
    model.projector.requires_grad_(True)
    llm_params = [p for p in model.llm.parameters() if p.requires_grad] + list(model.projector.parameters())
    tokenizer_params = [p for p in model.vision_tokenizer.parameters() if p.requires_grad]
    param_groups = [{"params": llm_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}]
    if tokenizer_params:
        param_groups.append({"params": tokenizer_params, "lr": settings.tokenizer_learning_rate, "weight_decay": 0.0})
    mode = "LoRA" if cfg.lora is not None else ("new rows only" if cfg.freeze_llm else "full")
    print(f"ett: {sum(p.numel() for p in llm_params) / 1e6:.2f}M trainable LLM + projector parameters ({mode}), "
          f"{sum(p.numel() for p in tokenizer_params) / 1e6:.2f}M tokenizer parameters "
          f"({'tuned' if settings.train_tokenizer else 'frozen'}), {len(examples)} examples "
          f"{components.task_counts(drawn, task_names)}, {precision} on {device}, {attention} attention")
    components.write_recipe(cfg, out)

    # --- train
    trainer = components.train(
        ETTTrainer, cfg, out, resume, precision, device,
        arguments={"include_num_input_tokens_seen": False},  # counted by ETTTrainer: tokenizing is in forward
        model=EndToEndModel(model, settings, cfg.packing, cfg.max_length or model.context_length),
        train_dataset=examples,
        data_collator=ETTCollator(tokenizer.processor),
        task_names=task_names,
        settings=settings,
        param_groups=param_groups,
        fsdp_refusal="ETT recipes tune the tokenizer inside the model's forward, which FSDP's wrapping does not cover",
    )

    # --- save
    model.eval()
    model.vision_tokenizer.eval()
    components.restore_inference_attention(model.llm)
    save = trainer.is_world_process_zero()  # the main process writes, each folder atomically
    if cfg.lora is not None:
        if save:
            components.save_adapter(model.llm, out / ADAPTER_DIR)
        model.merge_adapter()
    if save:
        model.save_pretrained(final, bake=settings.bake)  # last: OUT/model marks a finished run
        print(f"saved {final}")
    return final


__all__ = ["ETTCollator", "ETTSettings", "ETTTrainConfig", "ETTTrainer", "EndToEndModel", "bind_codes", "main"]
