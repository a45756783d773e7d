"""`UnifiedMLLM`: a plain HF causal LM whose vocabulary also holds the visual tokenizer's codes.

    text + images --MultimodalProcessor--> input_ids (B, T)   (image code k -> id image_offset + k)
    input_ids --embed_ids--> (B, T, H) --llm--> logits (B, T, V)

The LLM stays an ordinary `transformers` causal LM: in `learned` mode the
image ids are plain rows of its embedding matrix and `forward` is exactly the HF path
(`llm(input_ids=...)`). In `codebook` mode (ETT) the input embedding of image code k is
`projector(concat(sem_codebook[k], pix_codebook[k]))`, so the LLM loss reaches the projector and the
tokenizer's codebooks; because that embedding depends on k alone, `bake()` writes it into the image
rows of the embedding matrix and the model is a plain HF causal LM again.

Codebook mode needs untied input/output embeddings: with a tied head, writing the projected rows into
the embedding matrix would also change the output logits. `mllm init` unties a tied base in that mode.

A model folder (mllm.config): mllm_config.json, llm/, tokenizer/, vision_tokenizer/, and
projector.safetensors for an unbaked codebook-mode model. `save_pretrained` writes it atomically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.config import (
    CONFIG_NAME,
    LLM_DIR,
    PROJECTOR_NAME,
    TOKENIZER_DIR,
    VISION_TOKENIZER_DIR,
    MLLMConfig,
)
from mllm.io import recover_dir, write_dir
from mllm.runtime import resolve_device
from mllm.vocab import ImageVocabulary
from tokenizer_vision import DualCodebookTokenizer

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rows of the (K, H) image-embedding table computed at once by `image_embedding_rows` (bounds memory
# for large codebooks and hidden sizes).
_PROJECTION_CHUNK = 4096


def codebook_features(vision_tokenizer: DualCodebookTokenizer, codes: torch.Tensor) -> torch.Tensor:
    """Codes (...) -> concat of the unit-norm semantic and pixel codebook rows (..., d_sem + d_pix).

    Differentiable wrt the codebooks (when they require grad: codebook_update="loss"). A one-branch
    tokenizer ("pixel" / "semantic" quantizer mode) contributes its one codebook.
    """
    sem, pix = vision_tokenizer.embed(codes)
    return torch.cat([rows for rows in (sem, pix) if rows is not None], dim=-1)


def codebook_feature_size(vision_tokenizer: DualCodebookTokenizer) -> int:
    config = vision_tokenizer.config
    return {"dual": config.d_sem + config.d_pix, "pixel": config.d_pix, "semantic": config.d_sem}[
        config.quantizer_mode
    ]


class CodebookProjector(nn.Module):
    """Codebook features (..., d_sem + d_pix) -> LLM embedding rows (..., H).

    Two layers with a GELU, the connector shape of LLaVA-1.5 (mlp2x_gelu) and the `proj` of ETT.
    """

    def __init__(self, in_features: int, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.hidden_size, self.out_features = in_features, hidden_size, out_features
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))

    @torch.no_grad()
    def match_statistics(self, features: torch.Tensor, reference_rows: torch.Tensor) -> None:
        """Rescale the last layer so the outputs over `features` (K, in) have the per-dimension mean
        and the overall spread of `reference_rows` (N, H), the LLM's existing embedding rows.

        Image rows then start at the scale the LLM's layers expect: an embedding many times larger or
        smaller than the text rows would dominate or vanish in the first residual stream.
        """
        features = features.float()
        reference_rows = reference_rows.float()
        hidden = self.act(nn.functional.linear(features, self.fc1.weight.float(), self.fc1.bias.float()))  # (K, hidden)
        raw = hidden @ self.fc2.weight.float().t()  # (K, H), bias left out
        spread = (raw - raw.mean(0)).std().clamp_min(1e-12)
        target_mean = reference_rows.mean(0)  # (H,)
        target_spread = (reference_rows - target_mean).std()
        weight = self.fc2.weight.float() * (target_spread / spread)
        self.fc2.weight.copy_(weight.to(self.fc2.weight.dtype))
        self.fc2.bias.copy_((target_mean - hidden.mean(0) @ weight.t()).to(self.fc2.bias.dtype))

    def config_dict(self) -> dict[str, int]:
        return {"in_features": self.in_features, "hidden_size": self.hidden_size, "out_features": self.out_features}


def _versions() -> dict[str, str]:
    import transformers

    try:
        mllm_version = version("mllm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        mllm_version = "unknown"
    return {"mllm": mllm_version, "torch": torch.__version__, "transformers": transformers.__version__}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """None -> "auto" (the dtype the llm/ weights were saved in, transformers' default)."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, 'auto' or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Load-time checks: what the user gave (a model folder, an adapter folder, a device) is judged here,
# where its path is known, so a wrong or damaged folder is one ValueError / file error that names the
# path and says what to do, instead of a transformers, peft or safetensors traceback.

LLM_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_REBUILD_HINT = "copy the whole folder again, or rebuild it with `mllm init` / `mllm train`"
# What the libraries raise for a missing, truncated or corrupt file: transformers' OSError (also for a
# config.json that is not JSON), safetensors' own error, JSON and text decoding errors. Only the loading of
# one named file is wrapped in these, so a bug elsewhere keeps its own type and traceback.
_FILE_ERRORS = (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError)


def _error_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def reading(path: Path, what: str, hint: str = _REBUILD_HINT):
    """Turn a library's error about a damaged file into a ValueError naming `path`."""
    try:
        yield
    except _FILE_ERRORS as error:
        raise ValueError(f"cannot read the {what} {path}: {_error_text(error)} ({hint})") from error


def check_model_folder(model_dir: str | os.PathLike, vision_tokenizer: bool = True) -> Path:
    """Refuse what is not a complete model folder, before anything loads (no torch work).

    `vision_tokenizer`: whether the folder's vision_tokenizer/ is needed (not when one is passed in)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise FileNotFoundError(f"model folder {model_dir} does not exist (no {CONFIG_NAME} there: give a folder "
                                "made by `mllm init`, `mllm train` or `mllm merge`)")
    if not model_dir.is_dir():
        raise NotADirectoryError(f"model folder {model_dir} is a file, not a folder (give a folder made by "
                                 "`mllm init`, `mllm train` or `mllm merge`)")
    if not (model_dir / CONFIG_NAME).is_file():
        if (model_dir / ADAPTER_CONFIG_NAME).is_file():
            hint = "it is a LoRA adapter: pass it as --adapter next to the --model it was trained on"
        elif (model_dir / "config.json").is_file():
            hint = f"it is a plain Hugging Face model: make a model folder from it with `mllm init --llm {model_dir}`"
        else:
            hint = "make one with `mllm init`"
        raise FileNotFoundError(f"{model_dir} is not a model folder: {CONFIG_NAME} is missing ({hint})")
    required = [(LLM_DIR, ("config.json",)), (LLM_DIR, LLM_WEIGHT_FILES), (TOKENIZER_DIR, TOKENIZER_FILES)]
    if vision_tokenizer:
        required.append((VISION_TOKENIZER_DIR, ("config.json", "model.safetensors")))
    for folder, names in required:
        if not any((model_dir / folder / name).is_file() for name in names):
            missing = " or ".join(f"{folder}/{name}" for name in names)
            raise FileNotFoundError(f"model folder {model_dir} is incomplete: {missing} is missing ({_REBUILD_HINT})")
    return model_dir


def check_adapter_folder(adapter: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of a peft adapter folder; a ValueError / file error for anything else."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        state = "is a file, not a folder" if adapter.exists() else "does not exist"
        raise FileNotFoundError(f"adapter folder {adapter} {state} (give the adapter/ folder of a LoRA run, e.g. "
                                "OUT/adapter of `mllm train`)")
    config_file = adapter / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        hint = ("it is a model folder: pass it as --model, or merge an adapter into it with `mllm merge --base`"
                if (adapter / CONFIG_NAME).is_file() else "give the adapter/ folder of a LoRA run")
        raise ValueError(f"{adapter} is not a peft adapter folder: {ADAPTER_CONFIG_NAME} is missing ({hint})")
    with reading(config_file, "adapter config", "copy the adapter folder again"):
        config = json.loads(config_file.read_text())
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ValueError(f"{adapter} is not a peft adapter folder: {config_file} names no peft_type (give the "
                         "adapter/ folder of a LoRA run)")
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise FileNotFoundError(f"adapter folder {adapter} is incomplete: {' or '.join(ADAPTER_WEIGHT_FILES)} is "
                                "missing (copy the adapter folder again)")
    return config


def _adapter_token_rows(config: dict[str, Any]) -> list[int]:
    """The vocabulary rows an adapter trains (peft's trainable_token_indices: a list, or per module)."""
    indices = config.get("trainable_token_indices") or []
    groups = indices.values() if isinstance(indices, dict) else [indices]
    return [int(i) for group in groups for i in (group or [])]


def check_device(device: str | torch.device | None) -> torch.device:
    """`resolve_device`, with a ValueError for a device this machine does not have."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine (use cpu)")
    return resolved


def _resolve_attn_implementation(attn_implementation: str | None, device: torch.device) -> str:
    if attn_implementation is None:
        return "sdpa"
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package "
                "(pip install 'mllm[gpu]'); use 'sdpa' (the default) without it"
            )
        if device.type != "cuda":
            raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA only, not on {device}; use 'sdpa'")
    return attn_implementation


def _is_peft_model(module: nn.Module) -> bool:
    # A module can only be a PeftModel if peft was imported; checking sys.modules avoids importing
    # peft (and, through it, bitsandbytes) on every call of a plain model.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def _write_atomically(target: Path, write) -> None:
    """Call `write(tmp)` on a hidden sibling folder, then swap it in for `target` (`mllm.io.write_dir`).

    A save killed midway leaves the previous, complete `target` (restored from its hidden `.old` copy by
    the next save, or by `mllm.io.recover_dir`) or the new one, never a half-written folder under the
    target's name; every file is fsynced before the rename.
    """
    target = Path(target)
    recover_dir(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / CONFIG_NAME).is_file())):
        # Replacing a folder throws away everything in it: only ever an earlier model folder.
        raise FileExistsError(f"{target} exists and is not a model folder ({CONFIG_NAME} missing); not replacing it")
    write_dir(target, write)


class UnifiedMLLM(nn.Module):
    """HF causal LM + visual tokenizer + processor (+ the codebook projector in `codebook` mode).

    Attributes: `config` (MLLMConfig), `llm` (transformers causal LM, or a peft model wrapping it),
    `vision_tokenizer`, `processor` (MultimodalProcessor), `vocab` (ImageVocabulary), `projector`
    (CodebookProjector in codebook mode, else None).
    """

    def __init__(
        self,
        config: MLLMConfig,
        llm: nn.Module,
        vision_tokenizer: DualCodebookTokenizer,
        processor: Any,
        projector: CodebookProjector | None = None,
    ) -> None:
        super().__init__()
        if vision_tokenizer.codebook_size != config.codebook_size:
            raise ValueError(
                f"the vision tokenizer has {vision_tokenizer.codebook_size} codes but the config expects "
                f"{config.codebook_size}"
            )
        if tuple(vision_tokenizer.grid_size) != tuple(config.grid_size):
            raise ValueError(
                f"the vision tokenizer's grid {tuple(vision_tokenizer.grid_size)} differs from the config's "
                f"{tuple(config.grid_size)}"
            )
        rows = llm.get_input_embeddings().weight.shape[0]
        if rows < config.vocab_size:
            raise ValueError(f"the LLM has {rows} embedding rows but the config needs {config.vocab_size}")
        if config.embedding_mode == "codebook" and projector is None:
            raise ValueError("a codebook-mode model needs a projector")
        if config.embedding_mode == "learned" and projector is not None:
            raise ValueError("a learned-mode model has no projector (bake() drops it)")
        self.config = config
        self.llm = llm
        self.vision_tokenizer = vision_tokenizer
        self.processor = processor
        self.vocab = ImageVocabulary(config)
        self.projector = projector

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def context_length(self) -> int:
        """The LLM's max_position_embeddings: the longest sequence it was built for."""
        return int(self._base_llm().config.get_text_config().max_position_embeddings)

    def num_parameters(self, only_trainable: bool = False, include_vision_tokenizer: bool = False) -> int:
        """Parameters of the LLM and the projector (and the visual tokenizer when asked)."""
        modules = [self.llm] + ([self.projector] if self.projector is not None else [])
        if include_vision_tokenizer:
            modules.append(self.vision_tokenizer)
        return sum(
            p.numel() for module in modules for p in module.parameters() if p.requires_grad or not only_trainable
        )

    def train(self, mode: bool = True) -> UnifiedMLLM:
        """Set the LLM and projector's mode. The visual tokenizer stays as it is (eval after loading):
        in train mode its quantizer restarts dead codes and moves EMA codebooks, which only an
        end-to-end recipe wants; such a recipe calls `model.vision_tokenizer.train()` itself."""
        self.training = mode
        self.llm.train(mode)
        if self.projector is not None:
            self.projector.train(mode)
        return self

    # ------------------------------------------------------------------ embeddings
    def _base_llm(self) -> nn.Module:
        """The transformers model, under a peft wrapper if there is one."""
        return self.llm.get_base_model() if _is_peft_model(self.llm) else self.llm

    def _embed_scale(self, like: torch.Tensor) -> torch.Tensor | float:
        # Some embedding modules scale their output (Gemma3's ScaledWordEmbedding multiplies by
        # sqrt(H)); projected rows live in weight space, so they get the same scale as a looked-up row.
        scale = getattr(self.llm.get_input_embeddings(), "embed_scale", None)
        return 1.0 if scale is None else torch.as_tensor(scale).to(like.dtype)

    def project_codebook_features(self, features: torch.Tensor) -> torch.Tensor:
        """Codebook features (..., d_sem + d_pix) -> image embedding rows (..., H) in weight space."""
        if self.projector is None:
            raise ValueError("only a codebook-mode model has a projector")
        return self.projector(features.to(self.projector.fc1.weight.dtype))

    def image_embedding_rows(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """projector(concat(sem_codebook[k], pix_codebook[k])) for the codes (N,) (default: all K) -> (N, H)."""
        if codes is None:
            codes = torch.arange(self.config.codebook_size, device=self.vision_tokenizer.device)
        chunks = [
            self.project_codebook_features(codebook_features(self.vision_tokenizer, part))
            for part in codes.split(_PROJECTION_CHUNK)
        ]
        return torch.cat(chunks) if chunks else codes.new_zeros(0, self.projector.out_features, dtype=self.dtype)

    def embed_ids(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> input embeddings (B, T, H).

        learned mode: the LLM's own input embeddings. codebook mode: image positions get the projected
        codebook rows of their codes (differentiable wrt projector and codebooks). `image_features`
        (N, d_sem + d_pix), optional, codebook mode only: features to project for the N image positions
        in row-major order instead of the codebook rows (end-to-end tuning passes the tokenizer's
        straight-through features, so the loss also reaches its encoder).
        """
        embeddings = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        if self.config.embedding_mode == "learned":
            if image_features is not None:
                raise ValueError("image_features are only used in codebook mode")
            return embeddings
        image_positions = self.vocab.is_image_id(input_ids)  # (B, T)
        if image_features is not None:
            if image_features.shape[0] != int(image_positions.sum()):
                raise ValueError(
                    f"image_features has {image_features.shape[0]} rows but input_ids holds "
                    f"{int(image_positions.sum())} image ids"
                )
            rows = self.project_codebook_features(image_features)  # (N, H)
        elif bool(image_positions.any()):
            codes = self.vocab.ids_to_codes(input_ids[image_positions])  # (N,)
            # Project each distinct code once: a batch repeats codes, and the projector can be wide.
            unique_codes, inverse = codes.unique(return_inverse=True)
            rows = self.image_embedding_rows(unique_codes.to(self.vision_tokenizer.device))[inverse.to(self.device)]
        else:
            return embeddings
        rows = rows.to(device=embeddings.device, dtype=embeddings.dtype)
        embeddings = embeddings.clone()
        embeddings[image_positions] = rows * self._embed_scale(rows)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ):
        """The LLM's CausalLMOutputWithPast (`loss` over `labels` as transformers computes it)."""
        if self.config.embedding_mode == "learned" and image_features is None:
            # Exactly the plain HF path, so what trains here is what any engine serves from llm/.
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        return self.llm(
            inputs_embeds=self.embed_ids(input_ids, image_features),
            attention_mask=attention_mask,
            labels=labels,
            **llm_kwargs,
        )

    @torch.no_grad()
    def sync_image_embeddings(self) -> None:
        """codebook mode: write projector(codebooks) into the image rows of the input embedding matrix
        (the mode is unchanged), so id-based paths such as `llm.generate` with a KV cache see the same
        embeddings as `forward`. No-op in learned mode."""
        if self.config.embedding_mode != "codebook":
            return
        weight = self.llm.get_input_embeddings().weight  # (V, H)
        output = self.llm.get_output_embeddings()
        if output is not None and output.weight.data_ptr() == weight.data_ptr():
            raise ValueError(
                "codebook mode needs untied input/output embeddings: writing image rows into a tied "
                "matrix would change the logits (`mllm init --embedding codebook` unties them)"
            )
        start, end = self.vocab.image_id_range
        weight[start:end] = self.image_embedding_rows().to(device=weight.device, dtype=weight.dtype)

    def bake(self) -> None:
        """codebook -> learned: sync the image rows, drop the projector. The LLM alone then computes
        what `forward` did; the image rows train as ordinary rows from here on."""
        if self.config.embedding_mode != "codebook":
            return
        self.sync_image_embeddings()
        self.config.embedding_mode = "learned"
        self.config.projector_hidden_size = None
        self.projector = None

    def merge_adapter(self) -> None:
        """Fold a loaded peft adapter into the LLM's weights (`llm` becomes a plain HF model again)."""
        if not _is_peft_model(self.llm):
            raise ValueError("this model has no peft adapter to merge")
        self.llm = self.llm.merge_and_unload()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, model_dir: str | os.PathLike, bake: bool = True,
                        llm_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder atomically (temp folder + rename).

        A codebook-mode model is written baked by default (learned mode, no projector: llm/ alone
        reproduces the logits); the model in memory keeps its mode (only its image rows are synced).
        `bake=False` keeps codebook mode and writes projector.safetensors. `llm_state_dict`: the LLM's full
        weights when the module in memory holds only this process's shard (FSDP training), written as llm/.
        """
        if _is_peft_model(self.llm):
            raise ValueError(
                "the LLM carries a peft adapter: save the adapter with `model.llm.save_pretrained(dir)`, "
                "or call `model.merge_adapter()` first to write a full model folder"
            )
        codebook = self.config.embedding_mode == "codebook"
        config = MLLMConfig.from_dict(self.config.to_dict())
        if codebook and bake:
            self.sync_image_embeddings()
            config.embedding_mode, config.projector_hidden_size = "learned", None
        elif codebook:
            self.sync_image_embeddings()  # harmless in codebook mode, and llm/ then generates correctly too
        config.versions = _versions()
        generation_config = self.llm.generation_config
        generation_config.eos_token_id = config.end_of_turn_token_id
        generation_config.pad_token_id = config.pad_token_id

        def write(tmp: Path) -> None:
            self.llm.save_pretrained(tmp / LLM_DIR, state_dict=llm_state_dict)
            self.processor.save_pretrained(tmp)
            self.vision_tokenizer.save_pretrained(tmp / VISION_TOKENIZER_DIR)
            if codebook and not bake:
                state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.projector.state_dict().items()}
                save_file(state, tmp / PROJECTOR_NAME, metadata={"format": "pt", **{
                    k: str(v) for k, v in self.projector.config_dict().items()}})
            config.save(tmp)  # last: a folder with mllm_config.json is complete

        _write_atomically(Path(model_dir), write)
        return Path(model_dir)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        vision_tokenizer: DualCodebookTokenizer | None = None,
        quantization_config: Any = None,
    ) -> UnifiedMLLM:
        """Load a model folder (in eval mode).

        dtype: "bf16" | "fp16" | "fp32" | a torch dtype | None ("auto": the dtype llm/ was saved in);
        it applies to the LLM and the projector, the visual tokenizer stays in float32.
        attn_implementation: "sdpa" (default), "eager", or "flash_attention_2" (CUDA + flash-attn).
        adapter: a peft adapter folder (adapter_config.json) loaded onto the LLM.
        vision_tokenizer: an already loaded tokenizer to use instead of the folder's vision_tokenizer/
        (e.g. `DualCodebookTokenizer.from_pretrained(dir, codebook_update="loss")` for end-to-end tuning).
        quantization_config: a transformers quantization config for the LLM (`mllm.lora.load_base_4bit`).
        """
        from transformers import AutoModelForCausalLM

        from mllm.processor import MultimodalProcessor

        model_dir = check_model_folder(model_dir, vision_tokenizer=vision_tokenizer is None)
        with reading(model_dir / CONFIG_NAME, "model config"):
            try:
                config = MLLMConfig.load(model_dir)
            except (ValueError, TypeError) as error:  # a key missing, unknown or of the wrong type
                raise ValueError(f"{model_dir / CONFIG_NAME} is not a valid model config: {_error_text(error)} "
                                 f"({_REBUILD_HINT})") from error
        device = check_device(device)
        torch_dtype = _resolve_dtype(dtype)
        attn_implementation = _resolve_attn_implementation(attn_implementation, device)
        if attn_implementation == "flash_attention_2" and torch_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("flash_attention_2 needs dtype='bf16' or 'fp16'")
        if adapter is not None:
            _check_adapter_fits(Path(adapter), check_adapter_folder(adapter), config, model_dir)

        if vision_tokenizer is None:
            with reading(model_dir / VISION_TOKENIZER_DIR, "vision tokenizer"):
                vision_tokenizer = DualCodebookTokenizer.from_pretrained(model_dir / VISION_TOKENIZER_DIR)
        vision_tokenizer = vision_tokenizer.to(device)
        with reading(model_dir / TOKENIZER_DIR, "text tokenizer"):
            processor = MultimodalProcessor.from_pretrained(model_dir, vision_tokenizer=vision_tokenizer)
        with reading(model_dir / LLM_DIR, "LLM"):
            llm = AutoModelForCausalLM.from_pretrained(
                model_dir / LLM_DIR,
                dtype=torch_dtype,
                attn_implementation=attn_implementation,
                local_files_only=True,
                # bitsandbytes quantizes the weights as they load, on the device device_map names.
                **({"quantization_config": quantization_config, "device_map": str(device)}
                   if quantization_config is not None else {}),
            )
        if quantization_config is None:
            llm = llm.to(device)
        projector = None
        if config.embedding_mode == "codebook":
            projector_file = model_dir / PROJECTOR_NAME
            if not projector_file.is_file():
                raise ValueError(f"{model_dir} is a codebook-mode model but {PROJECTOR_NAME} is missing "
                                 f"({_REBUILD_HINT})")
            with reading(projector_file, "projector"):
                state = load_file(projector_file)
            projector = CodebookProjector(
                in_features=state["fc1.weight"].shape[1],
                hidden_size=state["fc1.weight"].shape[0],
                out_features=state["fc2.weight"].shape[0],
            )
            projector.load_state_dict(state)
            projector.to(device=device, dtype=llm.dtype)
        if adapter is not None:
            llm = _load_adapter(llm, Path(adapter), model_dir)
        # One config object shared with the processor, so bake() is seen by both.
        model = cls(processor.config, llm, vision_tokenizer, processor, projector)
        return model.eval()


def _other_model(adapter: Path, model_dir: Path, reason: str) -> ValueError:
    return ValueError(f"adapter {adapter} was trained on another model than {model_dir}: {reason} (load it onto "
                      "the model it was trained from)")


def _check_adapter_fits(adapter: Path, adapter_config: dict[str, Any], config: MLLMConfig, model_dir: Path) -> None:
    """Before anything loads: an adapter that trains vocabulary rows the model does not have."""
    token_rows = _adapter_token_rows(adapter_config)
    if token_rows and max(token_rows) >= config.vocab_size:
        raise _other_model(adapter, model_dir,
                           f"it trains vocabulary row {max(token_rows)}, the model has {config.vocab_size} rows")


def _load_adapter(llm: nn.Module, adapter: Path, model_dir: Path) -> nn.Module:
    """peft's PeftModel over `llm`; an adapter whose weights have other shapes is refused by name."""
    from peft import PeftModel

    try:
        with reading(adapter, "adapter", "copy the adapter folder again"):
            from mllm.lora import quiet_peft  # peft itself reads a deprecated transformers property

            with quiet_peft():
                return PeftModel.from_pretrained(llm, os.fspath(adapter), is_trainable=False)
    except RuntimeError as error:
        if "size mismatch" not in str(error):  # anything but a shape mismatch of the weights is a bug
            raise
        raise _other_model(adapter, model_dir, "its weights have other shapes") from error


__all__ = [
    "CodebookProjector",
    "UnifiedMLLM",
    "check_adapter_folder",
    "check_device",
    "check_model_folder",
    "codebook_feature_size",
    "codebook_features",
    "reading",
]
