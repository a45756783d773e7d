"""The lmms-eval model `mllm`: a model folder of ours (`mllm init` / `mllm train` / `mllm merge`) behind lmms-eval's
`lmms` interface.

    lmms-eval --model mllm --model_args pretrained=DIR[,batch_size=16,device=cuda,dtype=bf16,adapter=DIR] ...

`generate_until`: each request's images (`doc_to_visual`) then its text, in one user turn, exactly as
`mllm eval` sends an answer suite's item, through `MLLM.generate_text` in batches of `batch_size` requests
with the same generation settings, in lmms-eval's order (so the batches are those of `mllm eval --batch-size`
on the same items, and greedy answers are the same). From `gen_kwargs` it reads `until` (stop strings, cut
from the text), `max_new_tokens` (default 256), `temperature` (0: greedy; `do_sample: false` forces
greedy), `top_k`, `top_p` and `seed`; `num_beams` > 1 is refused.

`loglikelihood`: the log-probability of the continuation as the assistant's reply to the user turn (images,
then the context), from the LLM's logits over the text ids (image ids are left out, as text generation
suppresses them): the reply's tokens up to, not including, the end of turn. The
continuation's leading whitespace (lmms-eval's `target_delimiter`) is dropped, as a reply starts right after
the assistant header. `is_greedy`: every continuation token is the argmax.

Batch size: `batch_size` in `--model_args` wins over lmms-eval's `--batch_size` (whose default is 1).
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 256
_KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_k", "top_p", "seed", "num_beams"}


def _as_int(value: Any, name: str, default: int) -> int:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mllm: {name}={value!r} is not an integer") from None
    if number < 1:
        raise ValueError(f"mllm: {name}={number} must be at least 1")
    return number


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _stop_strings(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until] if until else []
    if isinstance(until, (list, tuple)):
        return [str(stop) for stop in until if stop]
    raise ValueError(f"mllm: gen_kwargs 'until' must be a string or a list of strings, got {until!r}")


def sampling_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's `gen_kwargs` -> the options of `MLLM.generate_text` (max_new_tokens, temperature, top_k,
    top_p, stop, seed)."""
    gen_kwargs = dict(gen_kwargs or {})
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError("mllm: beam search (num_beams > 1) is not supported; use greedy decoding or sampling")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if "do_sample" in gen_kwargs and not _as_bool(gen_kwargs["do_sample"]):
        temperature = 0.0
    top_k = gen_kwargs.get("top_k")
    top_p = gen_kwargs.get("top_p")
    seed = gen_kwargs.get("seed")
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "temperature": temperature,
        "top_k": int(top_k) if top_k not in (None, "", 0) else None,
        "top_p": float(top_p) if top_p not in (None, "") else None,
        "stop": _stop_strings(gen_kwargs.get("until")),
        "seed": int(seed) if seed not in (None, "") else None,
    }


def user_turn(visuals: list, text: str) -> list[dict[str, Any]]:
    """One user turn: every image, in order, then the text (the order the model was trained on, and the one
    `mllm eval` and lmms-eval's chat messages use)."""
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in visuals),
                                         {"type": "text", "text": text}]}]


def _flat_visuals(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat = []
    for visual in visuals:
        flat.extend(_flat_visuals(visual) if isinstance(visual, (list, tuple)) else [visual])
    return flat


class MLLMLmms(lmms):
    """lmms-eval's `lmms` over `mllm.load(pretrained)`; see the module docstring."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: Any = None, device: str | None = None,
                 dtype: str | None = None, adapter: str | None = None, max_batch_size: Any = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"mllm: unknown model_args {sorted(kwargs)} (known: pretrained, batch_size, device, "
                             "dtype, adapter)")
        import mllm

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None and world > 1:
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.pretrained = str(pretrained)
        self.mllm = mllm.load(self.pretrained, adapter=adapter, device=device, dtype=dtype)
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size", DEFAULT_BATCH_SIZE)
        if world > 1:
            self._rank = int(os.environ.get("RANK", "0"))
            self._world_size = world

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that a key given in `--model_args` wins over the same key from the command
        line (`--batch_size` defaults to 1 and would otherwise collide with `batch_size=` in model_args)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string or "")
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.mllm.model.device

    @property
    def model(self):
        return self.mllm.model

    @property
    def tokenizer(self):
        return self.mllm.model.processor.text_tokenizer

    # ------------------------------------------------------------------ requests
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        return _flat_visuals(doc_to_visual(self._doc(task, split, doc_id)))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One reply per request (see the module docstring)."""
        import json

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        replies: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mllm")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            options = sampling_options(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                conversations = []
                for index in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    conversations.append(user_turn(self._visuals(doc_to_visual, task, split, doc_id), context))
                answers = self.mllm.generate_text(conversations, **options)
                for index, answer in zip(batch, answers):
                    replies[index] = answer
                    self.cache_hook.add_partial("generate_until", (requests[index].args[0], gen_kwargs), answer)
                bar.update(len(batch))
        bar.close()
        return [reply or "" for reply in replies]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation as the reply, whether greedy decoding gives it) per request."""
        import torch

        model = self.mllm.model
        processor = model.processor
        end_ids = {int(model.config.end_of_turn_token_id)}
        eos = processor.text_tokenizer.eos_token_id
        if eos is not None:
            end_ids.add(int(eos))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mllm loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            prompts, fulls = [], []
            for request in batch:
                context, target, doc_to_visual, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                prompt = user_turn(self._visuals(doc_to_visual, task, split, doc_id), str(context))
                prompts.append(prompt)
                fulls.append(prompt + [{"role": "assistant",
                                        "content": [{"type": "text", "text": str(continuation).lstrip()}]}])
            with torch.no_grad():
                prompt_batch = processor(prompts, add_generation_prompt=True, padding_side="right",
                                         return_labels=False)
                full_batch = processor(fulls, add_generation_prompt=False, padding_side="right",
                                       return_labels=False)
                input_ids = full_batch["input_ids"].to(model.device)
                attention_mask = full_batch["attention_mask"].to(model.device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                logits[..., model.config.image_offset:] = float("-inf")  # a text reply: no image ids (as generation)
                logprobs = torch.log_softmax(logits, dim=-1)
            for row in range(len(batch)):
                prompt_length = int(prompt_batch["attention_mask"][row].sum())
                full_length = int(full_batch["attention_mask"][row].sum())
                prompt_ids = prompt_batch["input_ids"][row, :prompt_length].tolist()
                full_ids = full_batch["input_ids"][row, :full_length].tolist()
                if full_ids[:prompt_length] != prompt_ids:
                    raise ValueError("mllm: the chat template does not render the generation prompt as a prefix "
                                     "of the conversation with the reply; cannot score continuations")
                reply = full_ids[prompt_length:]
                end = next((k for k, token in enumerate(reply) if token in end_ids), len(reply))
                reply = reply[:end]
                if not reply:
                    results.append((0.0, True))
                    continue
                positions = torch.arange(prompt_length - 1, prompt_length - 1 + len(reply), device=logprobs.device)
                targets = torch.tensor(reply, device=logprobs.device)
                rows = logprobs[row, positions]
                total = float(rows.gather(-1, targets[:, None]).sum())
                greedy = bool((rows.argmax(dim=-1) == targets).all())
                results.append((total, greedy))
                self.cache_hook.add_partial("loglikelihood", (batch[row].args[0], str(batch[row].args[1])),
                                            (total, greedy))
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mllm: multi-round generation (generate_until_multi_round) is not implemented; "
                                  "the shapes tasks and other single-turn tasks use generate_until")
