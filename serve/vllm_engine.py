"""The vLLM serving engine (`mllm serve --engine vllm`): the same job interface as `serve.engine.Engine`, so the
HTTP layer (`serve.app`) is shared, with vLLM's continuous batching and paged KV cache underneath.

    HTTP handlers --submit(job)--> bounded queue --worker thread--> vLLM LLMEngine (in process) --> results

What stays ours: the processor turns messages and images into token ids (vLLM generates from
`prompt_token_ids` of the model folder's `llm/`, a plain HF causal LM whose vocabulary holds the image ids),
text is decoded by the processor (`decode_text`; vLLM's detokenizer is off), and drawn codes are decoded
to pixels by the folder's own vision tokenizer.

Each job becomes one small program per choice or image (`_chat_program`, `_image_program`): a Python
generator that yields vLLM steps (`_TextStep`, `_PairStep`) and gets their results back, so a chat reply
that starts an image (`<|boi|>`) goes text -> image -> text as `mllm.generation.chat` does, while the worker
keeps every program of every job in one vLLM batch.

Classifier-free guidance without forking vLLM: the conditional and the unconditional sequence of an image
are submitted as a pair of requests with the same seed and sampling settings. `MLLMLogitsProcessor`, a
vLLM v1 batch-level logits processor (`vllm.v1.sample.logits_processor.LogitsProcessor`: it sees the whole
batch's logits at once, which per-request processors do not, and it is the hook vLLM supports for custom
sampling logic in v1), restricts image positions to image ids and writes the guided logits
u + s (c - u) into BOTH rows, so both rows sample the same code (same logits, same seeded generator state)
and the unconditional sequence follows the conditional one, as in `mllm.generation`'s own loop. A row whose
partner is not in the batch at the same step (preempted, aborted, admitted a step later) is forced to emit
the `<|eoi|>` id, which ends it; the engine then sees an image that is not h*w image codes (or two rows
that disagree) and fails the request cleanly, after `pair_retries` fresh tries: an image is never drawn
unguided by accident. The worker admits a pair's two requests in the same engine step and keeps every
step's prefill within vLLM's token budget, so under normal load both start together.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the uniprocess executor for one device), so
requests added between two `step()` calls are scheduled together. With `tensor_parallel_size > 1`, vLLM
starts its own worker processes; the logits processor is found there by its import path.
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mllm.config import DRAW_TEMPERATURE, EDIT_TEMPERATURE
from serve.engine import Admission, Cancelled, ChatJob, EditJob, ImageJob, Reservation, _RowStreamer

EXTRA_KEY = "mllm"  # SamplingParams.extra_args key read by MLLMLogitsProcessor
MAX_IMAGES_PER_TURN = 4  # as mllm.generation.chat


class PairLost(RuntimeError):
    """A guided image lost its partner sequence (preemption, abort): it cannot be drawn with guidance.
    The server answers it with a 503 (`status`, `code`): the request may be retried."""

    status = 503
    code = "guidance_pair_lost"


# ------------------------------------------------------------------------------------------ logits processor
try:  # the module imports without vLLM (unit tests of `_apply`); the engine itself needs it
    from vllm.v1.sample.logits_processor import LogitsProcessor as _ProcessorBase
except ImportError:  # pragma: no cover
    _ProcessorBase = object


class _Row:
    __slots__ = ("output", "prompt_len", "spec")

    def __init__(self, spec: dict, prompt_len: int, output: list[int]) -> None:
        self.spec, self.prompt_len, self.output = spec, prompt_len, output


def _apply(rows: dict[int, _Row], logits: torch.Tensor) -> torch.Tensor:
    """The processor's work on (B, V) logits, rows keyed by batch index (a plain function: unit-testable)."""
    neg = float("-inf")
    pairs: dict[str, dict[str, int]] = {}
    for index, row in rows.items():
        spec = row.spec
        start, end = spec["image_range"]
        if spec["kind"] == "text":
            logits[index, start:end] = neg
            suppress = spec.get("suppress")
            if suppress:
                logits[index, suppress] = neg
            boi_until = spec.get("boi_until")
            if boi_until is not None and row.prompt_len + len(row.output) > boi_until:
                logits[index, spec["boi"]] = neg
            floor = spec.get("boi_floor")  # `config.chat_image_threshold`, on the reply's first token
            if floor is not None and not row.output:
                boi = spec["boi"]
                if float(torch.softmax(logits[index].float(), dim=-1)[boi]) >= floor:
                    logits[index] = neg
                    logits[index, boi] = 0.0
            continue
        # an image row: every position is an image position
        if spec.get("pair") is None:
            logits[index, :start] = neg
            logits[index, end:] = neg
            continue
        pairs.setdefault(spec["pair"], {})[spec["role"]] = index
    for members in pairs.values():
        c, u = members.get("c"), members.get("u")
        if c is not None and u is not None and len(rows[c].output) == len(rows[u].output):
            spec = rows[c].spec
            start, end = spec["image_range"]
            scale = float(spec["scale"])
            cond, uncond = logits[c, start:end], logits[u, start:end]
            guided = uncond + scale * (cond - uncond)
            for index in (c, u):
                logits[index] = neg
                logits[index, start:end] = guided
            continue
        for index in members.values():  # a partner is missing or out of step: end this row, never unguided
            poison = rows[index].spec["poison"]
            logits[index] = neg
            logits[index, poison] = 0.0
    return logits


class MLLMLogitsProcessor(_ProcessorBase):
    """vLLM v1 batch-level logits processor for mllm requests (those with `extra_args["mllm"]`).

    Text rows ("kind": "text"): image ids, control ids and, past `boi_until` tokens, `<|boi|>` suppressed
    (as `mllm.generation._generate_ids` and `_ImageRoom` do); with "boi_floor", the row's first token is
    `<|boi|>` whenever its chance is at least that (`_ImageStart`, `config.chat_image_threshold`).
    Image rows ("kind": "image"): only image ids; rows of a guidance pair (same "pair", roles "c" and "u") both get u + s (c - u) on the image ids when
    both are in the batch with as many output tokens; otherwise each present member is forced to emit
    its "poison" id (`<|eoi|>`), which ends it and lets the engine fail the request."""

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False) -> None:
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins: applied to the raw logits, before temperature

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            if spec is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(spec, len(prompt_ids or ()), output_ids)
        for first, second, direction in batch_update.moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if a is not None:
                self.rows[second] = a
            if b is not None and direction.name == "SWAP":
                self.rows[first] = b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        return _apply(self.rows, logits)


# ------------------------------------------------------------------------------------------ model shell
def load_shell(model_dir: str | os.PathLike, device: str | None = None) -> SimpleNamespace:
    """What the server needs of a model folder besides the LLM: processor, config, vocabulary, vision
    tokenizer and the LLM's generation config, shaped like `mllm.MLLM` (`.model.processor`, ...) so
    `serve.app` and `mllm.generation`'s prompt helpers take it. The LLM's weights are vLLM's alone."""
    from transformers import AutoConfig, GenerationConfig

    from mllm.config import LLM_DIR, PROJECTOR_NAME, TOKENIZER_DIR, VISION_TOKENIZER_DIR, MLLMConfig
    from mllm.model import check_model_folder
    from mllm.processor import MultimodalProcessor
    from mllm.vocab import ImageVocabulary
    from tokenizer_vision import DualCodebookTokenizer

    model_dir = check_model_folder(model_dir)
    config = MLLMConfig.load(model_dir)
    if config.embedding_mode == "codebook" and (Path(model_dir) / PROJECTOR_NAME).is_file():
        raise ValueError(f"{model_dir} is a codebook-mode model that is not baked ({PROJECTOR_NAME}): vLLM serves "
                         "plain LLM folders; bake it first (`mllm merge`), or use --engine builtin")
    vision = DualCodebookTokenizer.from_pretrained(Path(model_dir) / VISION_TOKENIZER_DIR).eval()
    if device:
        vision = vision.to(device)
    processor = MultimodalProcessor.from_pretrained(model_dir, vision_tokenizer=vision)
    llm_dir = Path(model_dir) / LLM_DIR
    llm_config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
    try:
        generation_config = GenerationConfig.from_pretrained(llm_dir, local_files_only=True)
    except OSError:
        generation_config = None
    inner = SimpleNamespace(
        config=processor.config, processor=processor, vocab=ImageVocabulary(processor.config),
        vision_tokenizer=vision, device=torch.device("cpu"),
        context_length=int(llm_config.get_text_config().max_position_embeddings),
        llm=SimpleNamespace(generation_config=generation_config, config=llm_config),
        model_dir=Path(model_dir), llm_dir=llm_dir, tokenizer_dir=Path(model_dir) / TOKENIZER_DIR,
    )
    return SimpleNamespace(model=inner, config=processor.config)


# ------------------------------------------------------------------------------------------ programs
@dataclass
class _TextStep:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop_ids: list[int]
    spec: dict
    stream: Any = None  # a _RowStreamer, fed each new token
    stop: list[str] = field(default_factory=list)


@dataclass
class _PairStep:
    """One image: the conditional prefix (and the unconditional one under guidance), both ending in <|boi|>."""

    cond: list[int]
    uncond: list[int] | None
    scale: float
    temperature: float
    seed: int | None


class _Program:
    """One generator (a chat choice, an image) and the vLLM requests of its current step."""

    def __init__(self, job, slot: int, gen: Generator) -> None:
        self.job, self.slot, self.gen = job, slot, gen
        self.step: _TextStep | _PairStep | None = None
        self.requests: dict[str, dict] = {}  # request id -> {"ids": [...], "finish": str | None, "done": bool}
        self.result: Any = None
        self.done = False


class VLLMEngine(Admission):
    """`serve.engine.Engine`'s interface (reserve / submit / snapshot / close; ChatJob, ImageJob, EditJob)
    on a vLLM `LLMEngine` driven by one worker thread."""

    def __init__(self, model, *, queue_size: int = 64, default_max_tokens: int = 256, max_num_seqs: int = 64,
                 tensor_parallel_size: int = 1, dtype: str = "auto", kv_cache_gib: float = 1.0,
                 max_num_batched_tokens: int | None = None, pair_retries: int = 1, enforce_eager: bool = True,
                 llm_engine=None, **_ignored: Any) -> None:
        super().__init__(queue_size, engine="vllm", pairs_lost=0)
        self.model = model  # load_shell(...) or an mllm.MLLM: processor, config, vision tokenizer
        inner = model.model
        self.default_max_tokens, self.pair_retries = default_max_tokens, pair_retries
        self.max_num_seqs = max_num_seqs
        self.context_length = int(inner.context_length)
        self.max_num_batched_tokens = max_num_batched_tokens or max(8192, 2 * self.context_length)
        self._ids = itertools.count()
        self._programs: dict[str, _Program] = {}  # vLLM request id -> its program
        self._jobs: dict[int, list[_Program]] = {}  # id(job) -> its programs
        self._pending: deque = deque()  # jobs taken from the queue, waiting for room in the batch
        self.on_pair_submitted: Callable[[str, str | None], None] | None = None  # tests: (cond id, uncond id)
        self._static_spec()
        self._llm = llm_engine if llm_engine is not None else self._start_vllm(
            inner, tensor_parallel_size, dtype, kv_cache_gib, enforce_eager)
        # vLLM seeds the global RNGs at start-up (to 0): unseeded requests must not become predictable.
        random.seed(os.urandom(16))
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mllm-vllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ set-up
    def _start_vllm(self, inner, tensor_parallel_size: int, dtype: str, kv_cache_gib: float, enforce_eager: bool):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: see the docstring
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        kwargs: dict[str, Any] = {}
        if not torch.cuda.is_available():
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        args = EngineArgs(
            model=str(inner.llm_dir), tokenizer=str(inner.tokenizer_dir), dtype=dtype,
            max_model_len=self.context_length, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, tensor_parallel_size=tensor_parallel_size,
            logits_processors=[MLLMLogitsProcessor], enforce_eager=enforce_eager, disable_log_stats=True,
            seed=0, **kwargs)
        config = args.create_engine_config()
        return LLMEngine(vllm_config=config, executor_class=Executor.get_class(config), log_stats=False,
                         multiprocess_mode=False)

    def _static_spec(self) -> None:
        from mllm.generation import _end_of_reply_ids
        from mllm.vocab import special_token_ids

        inner = self.model.model
        config = inner.config
        self.ends = _end_of_reply_ids(inner)
        self.boi, self.eoi = config.boi_token_id, config.eoi_token_id
        self.image_range = list(inner.vocab.image_id_range)
        self.grid = tuple(config.grid_size)
        self.steps = self.grid[0] * self.grid[1]
        control = special_token_ids(inner.processor.text_tokenizer) | {config.boi_token_id, config.eoi_token_id,
                                                                       config.image_token_id}
        self.control = control

    def _text_spec(self, allow_boi: bool, boi_until: int | None, boi_floor: float | None = None) -> dict:
        allowed = set(self.ends) | ({self.boi} if allow_boi else set())
        suppress = sorted(i for i in self.control if i not in allowed and 0 <= i < self.image_range[0])
        return {"kind": "text", "image_range": self.image_range, "suppress": suppress, "boi": self.boi,
                "boi_until": boi_until if allow_boi else None, "boi_floor": boi_floor if allow_boi else None}

    # ------------------------------------------------------------------ client side (Engine's interface)
    def reserve(self) -> Reservation:
        if self._error is not None:
            raise RuntimeError("the vLLM engine stopped") from self._error
        return super().reserve()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "running": len(self._programs)}

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_jobs()
                self._check_cancelled()
                self._admit()
                if self._llm.has_unfinished_requests():
                    running = self._llm.get_num_unfinished_requests()
                    self.stats["batches"] += 1
                    self.stats["batch_sizes"][running] += 1
                    self.stats["max_batch"] = max(self.stats["max_batch"], running)
                    for output in self._llm.step():
                        self._on_output(output)
                elif not self._pending:
                    try:
                        job = self._queue.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._slots.release()
                    self._pending.append(job)
        except BaseException as error:  # noqa: BLE001 - every waiting job gets the error
            self._error = error
            for program in list(self._programs.values()):
                self._fail_job(program.job, error)
            while self._pending:
                self._fail_job(self._pending.popleft(), error)

    def _take_jobs(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            self._slots.release()
            self._pending.append(job)

    def _check_cancelled(self) -> None:
        for job in [job for job in self._pending if job.cancelled.is_set()]:
            self._pending.remove(job)
            self.stats["cancelled"] += 1
            job.error = Cancelled()
            job.done.set()
        for key, programs in list(self._jobs.items()):
            job = programs[0].job
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._finish_job(job, Cancelled())

    def _admit(self) -> None:
        """Start pending jobs while the batch has room: every request added before one `step()` must be
        scheduled in it (a guidance pair starts together), so the new prompts stay within the token budget."""
        budget = self.max_num_batched_tokens - len(self._programs)
        seqs = self.max_num_seqs - len(self._programs)
        while self._pending:
            job = self._pending[0]
            rows = job.n * (2 if not isinstance(job, ChatJob) and job.guidance_scale != 1.0 else 1)
            if self._programs and rows > seqs:
                return
            self._pending.popleft()
            try:
                programs = self._start_job(job)
            except BaseException as error:  # noqa: BLE001 - a bad request (e.g. too long) fails alone
                self.stats["errors"] += 1
                job.error = error
                job.done.set()
                continue
            used = sum(len(r) for p in programs for r in _step_prompts(p.step))
            budget -= used
            seqs -= rows
            if budget <= 0 or seqs <= 0:
                return

    def _start_job(self, job) -> list[_Program]:
        if isinstance(job, ChatJob):
            gens = self._chat_programs(job)
        elif isinstance(job, ImageJob):
            gens = self._image_programs(job)
        else:
            gens = self._edit_programs(job)
        programs = [_Program(job, slot, gen) for slot, gen in enumerate(gens)]
        self._jobs[id(job)] = programs
        job.result = [None] * len(programs)
        for program in programs:
            self._advance(program, None)
        return programs

    # ------------------------------------------------------------------ programs -> vLLM requests
    def _advance(self, program: _Program, value) -> None:
        try:
            step = program.gen.send(value) if program.step is not None or value is not None else next(program.gen)
        except StopIteration as stop:
            program.done, program.step = True, None
            program.job.result[program.slot] = stop.value
            self._maybe_finish(program.job)
            return
        except BaseException as error:  # noqa: BLE001
            self._finish_job(program.job, error)
            return
        program.step = step
        program.requests = {}
        self._submit_step(program, step)

    def _submit_step(self, program: _Program, step) -> None:
        from vllm import SamplingParams

        if isinstance(step, _TextStep):
            rid = f"t{next(self._ids)}"
            params = SamplingParams(max_tokens=step.max_tokens, temperature=step.temperature,
                                    top_p=step.top_p if step.top_p is not None else 1.0, seed=step.seed,
                                    stop_token_ids=list(step.stop_ids), ignore_eos=True, detokenize=False,
                                    skip_special_tokens=False, extra_args={EXTRA_KEY: step.spec})
            self._add(program, rid, step.prompt, params)
            return
        pair = f"p{next(self._ids)}"
        seed = step.seed if step.temperature > 0 else None
        common = {"kind": "image", "image_range": self.image_range, "poison": self.eoi,
                  "pair": pair if step.uncond is not None else None, "scale": step.scale}
        ids = []
        for role, prompt in (("c", step.cond), ("u", step.uncond)):
            if prompt is None:
                continue
            params = SamplingParams(max_tokens=self.steps, temperature=step.temperature, seed=seed,
                                    stop_token_ids=[self.eoi], ignore_eos=True, detokenize=False,
                                    skip_special_tokens=False, extra_args={EXTRA_KEY: {**common, "role": role}})
            rid = f"{pair}{role}"
            self._add(program, rid, prompt, params)
            ids.append(rid)
        if self.on_pair_submitted is not None:
            self.on_pair_submitted(ids[0], ids[1] if len(ids) > 1 else None)

    def _add(self, program: _Program, rid: str, prompt: list[int], params) -> None:
        program.requests[rid] = {"ids": [], "finish": None, "done": False}
        self._programs[rid] = program
        self._llm.add_request(rid, {"prompt_token_ids": [int(i) for i in prompt]}, params)

    def abort(self, request_id: str) -> None:
        """Abort one vLLM request (worker thread only): it ends with finish "abort"."""
        program = self._programs.pop(request_id, None)
        self._llm.abort_request([request_id])
        if program is not None:
            state = program.requests[request_id]
            state["done"], state["finish"] = True, "abort"
            self._step_complete(program)

    def _on_output(self, output) -> None:
        program = self._programs.get(output.request_id)
        if program is None:
            return
        state = program.requests[output.request_id]
        completion = output.outputs[0]
        new = list(completion.token_ids)[len(state["ids"]):]
        state["ids"] = list(completion.token_ids)
        step = program.step
        if isinstance(step, _TextStep) and new:
            if step.stream is not None:
                for token in new:
                    step.stream.put(torch.tensor([token]))
            if step.stop and not output.finished:
                text = self.model.model.processor.decode_text(state["ids"])
                if any(s in text for s in step.stop):  # a stop string: end the request here
                    self._llm.abort_request([output.request_id])
                    output.finished, completion.finish_reason = True, "stop"
        if output.finished:
            state["done"], state["finish"] = True, completion.finish_reason
            self._programs.pop(output.request_id, None)
            self._step_complete(program)

    def _step_complete(self, program: _Program) -> None:
        if not all(state["done"] for state in program.requests.values()) or program.done:
            return
        step = program.step
        if isinstance(step, _TextStep):
            (state,) = program.requests.values()
            if step.stream is not None:
                step.stream.end()
            self._advance(program, (state["ids"], state["finish"]))
            return
        states = list(program.requests.values())
        codes = [s["ids"] for s in states]
        start, end = self.image_range
        complete = all(len(c) == self.steps and all(start <= i < end for i in c) for c in codes)
        if complete and all(c == codes[0] for c in codes):
            self._advance(program, [i - start for i in codes[0]])
        else:
            self.stats["pairs_lost"] += 1
            self._advance(program, PairLost("the guided image lost its partner sequence (preempted or aborted "
                                            "in vLLM); it was not drawn without guidance"))

    # ------------------------------------------------------------------ finishing
    def _maybe_finish(self, job) -> None:
        programs = self._jobs.get(id(job))
        if programs is not None and all(p.done for p in programs):
            self._finish_job(job, None)

    def _finish_job(self, job, error: BaseException | None) -> None:
        programs = self._jobs.pop(id(job), [])
        for program in programs:
            program.done = True
            for rid, state in program.requests.items():
                if not state["done"] and self._programs.pop(rid, None) is not None:
                    self._llm.abort_request([rid])
        if job.done.is_set():
            return
        if error is None:
            try:
                self._complete(job)
            except BaseException as failure:  # noqa: BLE001
                error = failure
        if error is not None:
            if not isinstance(error, Cancelled):
                self.stats["errors"] += 1
            job.error = error
        job.done.set()

    def _fail_job(self, job, error: BaseException) -> None:
        if not job.done.is_set():
            job.error = error
            job.done.set()

    def _complete(self, job) -> None:
        inner = self.model.model
        if isinstance(job, ChatJob):
            results = []
            for choice in job.result:
                images = inner.vision_tokenizer.decode_images(torch.stack(choice["codes"])) if choice["codes"] else []
                results.append({"text": choice["text"], "images": images, "finish_reason": choice["finish_reason"],
                                "completion_tokens": choice["completion_tokens"]})
            job.result = results
            return
        codes = torch.stack([torch.tensor(c).view(*self.grid) for c in job.result])
        with torch.inference_mode():
            job.result = inner.vision_tokenizer.decode_images(codes)

    # ------------------------------------------------------------------ the programs themselves
    def _seeds(self, seed: int | None, n: int) -> list[int]:
        base = seed if seed is not None else random.randrange(2**31 - 1 - n)
        return [base + k for k in range(n)]

    def _image_programs(self, job: ImageJob) -> list[Generator]:
        from mllm.generation import _check_image_room, _draw_prefixes

        inner = self.model.model
        cond = _draw_prefixes(inner, [inner.processor.draw_conversation(job.prompt)])
        _check_image_room(inner, [job.prompt], cond)
        uncond = None
        if job.guidance_scale != 1.0:
            uncond = _draw_prefixes(inner, [inner.processor.unconditional_draw_conversation()])[0].tolist()
        return [self._image(cond[0].tolist(), uncond, job.guidance_scale, DRAW_TEMPERATURE, seed)
                for seed in self._seeds(job.seed, job.n)]

    def _edit_programs(self, job: EditJob) -> list[Generator]:
        from mllm.generation import _check_image_room, _draw_prefixes

        if job.image_guidance_scale is not None:  # a guidance triple, where the logits processor pairs rows
            raise ValueError("'image_guidance_scale' (two guidances at once) is not served by the vLLM engine: "
                             "leave it out, or serve with the builtin engine")
        inner = self.model.model
        processor = inner.processor
        source = {"type": "image", "codes": processor.encode_images([job.image])[0]}
        cond = _draw_prefixes(inner, [processor.edit_conversation(source, job.prompt)])
        _check_image_room(inner, [job.prompt], cond)
        uncond = None
        if job.guidance_scale != 1.0:
            dropped = (processor.edit_conversation(None, "", drop="both") if job.guidance == "both"
                       else processor.edit_conversation(source, "", drop="instruction"))
            uncond = _draw_prefixes(inner, [dropped])[0].tolist()
        return [self._edit(cond[0].tolist(), uncond, job.guidance_scale, seed) for seed in self._seeds(job.seed, job.n)]

    def _edit(self, cond: list[int], uncond: list[int] | None, scale: float, seed: int):
        """One edit, as `mllm.generation.edit_images`: the model's description of the result first (greedy, up
        to its <|boi|>; none for a model trained on image-only replies), then the image after it."""
        from mllm.generation import EDIT_DESCRIPTION_TOKENS

        prompt = cond[:-1]
        stop_ids = [self.boi, *self.ends]
        ids, _ = yield _TextStep(prompt, EDIT_DESCRIPTION_TOKENS, 0.0, None, None, stop_ids,
                                 self._text_spec(True, None))
        words = [token for token in ids if token not in stop_ids]
        if len(prompt) + len(words) + self.steps + 2 > self.context_length:
            words = []  # no room for the description and the image: the image alone
        return (yield from self._image(prompt + words + [self.boi], uncond, scale, EDIT_TEMPERATURE, seed))

    def _image(self, cond: list[int], uncond: list[int] | None, scale: float, temperature: float, seed: int):
        for attempt in range(self.pair_retries + 1):
            result = yield _PairStep(cond, uncond, scale, temperature, seed)
            if not isinstance(result, PairLost):
                return result
            if attempt == self.pair_retries:
                raise result
        raise AssertionError("unreachable")  # pragma: no cover

    def _chat_programs(self, job: ChatJob) -> list[Generator]:
        from mllm.generation import _encode_prompts, edit_order

        inner = self.model.model
        batch = _encode_prompts(inner, [job.messages])
        prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        job.prompt_tokens = len(prompt)
        edit_turn = edit_order(job.messages)
        edit_prompt = None
        if edit_turn is not None:
            batch = _encode_prompts(inner, [edit_turn])
            edit_prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        seeds = self._seeds(job.seed, job.n) if job.seed is not None else [None] * job.n
        return [self._chat(job, choice, prompt, seeds[choice], edit_prompt) for choice in range(job.n)]

    def _chat(self, job: ChatJob, choice: int, prompt: list[int], seed: int | None,
              edit_prompt: list[int] | None = None):
        """One choice of a chat turn: text until the end of turn, a stop string or the budget; an image
        where the model starts one and it fits (drawn with the job's guidance), then more text. An edit
        request sent image first (`edit_prompt`: the turn read instruction first, `mllm.generation.edit_order`)
        has its image drawn from that reading, as the built-in engine does."""
        from mllm.generation import _draw_prefixes, _finish_text

        inner = self.model.model
        per_image = self.steps + 2
        budget = min(job.max_tokens or self.default_max_tokens, self.context_length - len(prompt))
        limit = len(prompt) + budget
        generated: list[int] = []
        codes: list[torch.Tensor] = []
        stream = _RowStreamer(inner, [job.on_delta], [choice], job.stop) if job.on_delta is not None else None
        if stream is not None:
            stream.put(torch.tensor([0]))  # the "prompt" call
        rng = random.Random(seed) if seed is not None else random
        finish, streamed = "length", ""
        while len(prompt) + len(generated) < limit:
            may_draw = len(codes) < MAX_IMAGES_PER_TURN
            last_start = limit - per_image
            # The reply's first token on a turn of an image then text: `config.chat_image_threshold`.
            floor = inner.config.chat_image_threshold if edit_prompt is not None and not generated else None
            spec = self._text_spec(may_draw, last_start, floor)
            stop_ids = [*self.ends, self.boi] if may_draw else list(self.ends)
            step_seed = None if seed is None else rng.randrange(2**31 - 1)
            ids, reason = yield _TextStep(prompt + generated, limit - len(prompt) - len(generated), job.temperature,
                                          job.top_p, step_seed, stop_ids, spec, stream, list(job.stop))
            generated += ids
            if reason == "stop" and not (ids and ids[-1] in stop_ids):  # a stop string
                finish = "stop"
                break
            if ids and ids[-1] in self.ends:
                finish = "stop"
                break
            if not (ids and ids[-1] == self.boi):
                break  # the budget
            if len(prompt) + len(generated) - 1 + per_image > limit:  # no room (never: boi_until guards it)
                generated.pop()
                continue
            if edit_prompt is not None and not codes:
                reordered_limit = len(edit_prompt) + (limit - len(prompt))
                if len(edit_prompt) + len(generated) - 1 + per_image <= min(reordered_limit, self.context_length):
                    prompt, limit = edit_prompt, reordered_limit
            uncond = None
            if job.guidance_scale != 1.0:
                uncond = _draw_prefixes(inner, [inner.processor.unconditional_draw_conversation()])[0].tolist()
            image_seed = rng.randrange(2**31 - 1)
            image = yield from self._image(prompt + generated, uncond, job.guidance_scale, DRAW_TEMPERATURE,
                                           image_seed)
            codes.append(torch.tensor(image).view(*self.grid))
            generated += [i + self.image_range[0] for i in image] + [self.eoi]
            streamed, stream = (stream.text(0) if stream is not None else streamed), None
        text = _finish_text(inner, generated, job.stop)
        if codes and job.on_delta is not None and text.startswith(streamed) and len(text) > len(streamed):
            job.on_delta(choice, text[len(streamed):])  # as the built-in engine: the text after an image at the end
        return {"text": text, "codes": codes, "finish_reason": finish, "completion_tokens": len(generated)}


def _step_prompts(step) -> list[list[int]]:
    if isinstance(step, _TextStep):
        return [step.prompt]
    if isinstance(step, _PairStep):
        return [p for p in (step.cond, step.uncond) if p is not None]
    return []


__all__ = ["MLLMLogitsProcessor", "PairLost", "VLLMEngine", "load_shell"]
