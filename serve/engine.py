"""The serving engine: one worker thread owns the model; requests are queued and batched dynamically.

    HTTP handlers --submit(job)--> bounded queue --worker--> batches --> results / stream deltas

The worker takes the first waiting job, then keeps collecting for `batch_window_s` (or until `max_batch`
rows), and runs what it collected in as few forward passes as the jobs allow:

- chat jobs whose sampling settings agree (greedy ones always agree; sampled ones when temperature,
  top_p and stop strings match and no seed is asked for) share one `generate()` call: their prompts are
  left-padded into one batch, each row stops at its own end of turn, its own `max_tokens` budget
  (`_RowLimits`) or when its client went away; a streamed job gets its tokens as they are produced
  (`_RowStreamer`). A row that starts an image (`<|boi|>`) is finished by `mllm.generation.chat` on its
  own (text, the drawn image, more text), since drawing is the rare case in a chat.
- image jobs with the same guidance scale and decoding method share one `generate_images` call (one row per
  image, seeded per image), whatever their prompts and counts. Under "auto" (the default) that call
  decodes by speculative Jacobi decoding when it holds a few images and sequentially when the batch is
  larger (the faster way on a CPU), so a seeded "auto" image depends on the load; a request that names
  "jacobi" or "sequential" gets an image that depends on its prompt and seed only. Edit jobs (an image and
  an instruction) likewise share one `edit_images` call when their guidance scale, guidance mode and decoding
  agree, one row per edited image (its source repeated). A chat job's `decoding`
  only concerns the images it draws, which `chat` draws for that row alone, so it does not split the
  batched text pass.

Admission is bounded (`queue_size`): a request takes a slot (`reserve()`) before the server does any
costly work for it (decoding its images), and gives it back when the worker takes its job; with every slot
taken, new requests are refused (`QueueFull`, HTTP 429). A job can be cancelled at any time (`job.cancel()`,
e.g. when its client disconnects): a waiting job is dropped, a running row stops at the next token. `stats`
counts requests, batches and the largest batch.

Seeds never touch the global RNG for long: a seeded chat job runs inside `torch.random.fork_rng` (the
global state is restored afterwards, so later unseeded requests do not become predictable), and image jobs
seed one `torch.Generator` per image.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mllm.config import DEFAULT_DECODING, DRAW_GUIDANCE_SCALE, EDIT_GUIDANCE, EDIT_GUIDANCE_SCALE

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self


class QueueFull(Exception):
    """The engine's queue is full: the client should retry later (HTTP 429)."""


class Cancelled(Exception):
    """The job was cancelled (its client disconnected)."""


@dataclass(eq=False)
class ChatJob:
    messages: list[dict]
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    n: int = 1
    guidance_scale: float = DRAW_GUIDANCE_SCALE
    decoding: str = DEFAULT_DECODING  # of the images drawn in the reply: "auto" | "jacobi" | "sequential"
    on_delta: Callable[[int, str], None] | None = None  # (choice index, new text), called from the worker
    # filled by the engine
    result: list[dict] | None = None  # per choice: {"text", "images", "finish_reason", "completion_tokens"}
    prompt_tokens: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class ImageJob:
    prompt: str
    n: int = 1
    guidance_scale: float = DRAW_GUIDANCE_SCALE
    seed: int | None = None
    decoding: str = DEFAULT_DECODING  # "auto" | "jacobi" | "sequential"
    result: list | None = None  # PIL images
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class EditJob:
    image: Any  # the source image, PIL RGB (shrunk to the tokenizer's size by the app)
    prompt: str  # the instruction
    n: int = 1
    guidance_scale: float = EDIT_GUIDANCE_SCALE
    guidance: str = EDIT_GUIDANCE  # what guidance's unconditional branch drops: "instruction" | "both"
    image_guidance_scale: float | None = None  # both guidances at once (`edit_images`); None: off
    seed: int | None = None
    decoding: str = DEFAULT_DECODING  # "auto" | "jacobi" | "sequential"
    result: list | None = None  # PIL images
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


Job = ChatJob | ImageJob | EditJob


class Reservation:
    """A slot in the engine's bounded admission, held from `Engine.reserve()` until the job is queued
    (`submit`, after which the worker gives the slot back when it takes the job) or the request gives up
    (`release`, or leaving the `with` block without submitting)."""

    def __init__(self, engine: Engine) -> None:
        self._engine, self._held = engine, True

    def submit(self, job: Job) -> None:
        if not self._held:
            raise RuntimeError("this reservation was used or released already")
        self._held = False  # the queued job holds the slot now
        self._engine._put(job)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine._slots.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Admission:
    """What every engine shares with the HTTP layer: bounded admission (`reserve` / `submit`, QueueFull), the
    queue its worker takes jobs from, and the counters `/health` shows (`snapshot`)."""

    def __init__(self, queue_size: int, **stats: Any) -> None:
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(queue_size)  # admitted requests not yet taken by the worker
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots
        self.stats: dict[str, Any] = {"requests": 0, "batches": 0, "max_batch": 0, "batch_sizes": Counter(),
                                      "cancelled": 0, "errors": 0, **stats}

    def reserve(self) -> Reservation:
        """A slot for one request, or QueueFull when `queue_size` requests are admitted and not yet running."""
        if not self._slots.acquire(blocking=False):
            raise QueueFull(f"the server is busy ({self.queue_size} requests waiting); retry later")
        return Reservation(self)

    def submit(self, job: Job) -> None:
        """Reserve a slot and queue `job` (QueueFull when none is free)."""
        self.reserve().submit(job)

    def _put(self, job: Job) -> None:
        self._queue.put_nowait(job)
        self.stats["requests"] += 1

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def snapshot(self) -> dict[str, Any]:
        stats = dict(self.stats)
        stats["batch_sizes"] = {str(k): v for k, v in sorted(self.stats["batch_sizes"].items())}
        stats["waiting"] = self.waiting
        return stats


class Engine(Admission):
    def __init__(self, model, max_batch: int = 8, batch_window_s: float = 0.02, queue_size: int = 64,
                 default_max_tokens: int = 256) -> None:
        super().__init__(queue_size)
        self.model = model  # mllm.api.MLLM
        self.max_batch, self.batch_window_s, self.default_max_tokens = max_batch, batch_window_s, default_max_tokens
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mllm-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._slots.release()
            jobs = [first]
            deadline = time.monotonic() + self.batch_window_s
            while sum(_rows(job) for job in jobs) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    jobs.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
                self._slots.release()
            live = []
            for job in jobs:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    job.error = Cancelled()
                    job.done.set()
                else:
                    live.append(job)
            for group in _groups(live, self.max_batch):
                self._run(group)

    def _run(self, group: list) -> None:
        self.stats["batches"] += 1
        size = sum(_rows(job) for job in group)
        self.stats["batch_sizes"][size] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], size)
        try:
            with torch.inference_mode():
                if isinstance(group[0], ImageJob):
                    self._run_images(group)
                elif isinstance(group[0], EditJob):
                    self._run_edits(group)
                else:
                    self._run_chat(group)
        except ValueError as error:
            if len(group) > 1:  # one bad request (e.g. a prompt over the context) must not fail the others
                for job in group:
                    if not job.done.is_set():
                        self._run([job])
                return
            self._fail(group, error)
        except BaseException as error:  # noqa: BLE001 - every job of the group gets the error; the worker lives on
            self._fail(group, error)

    def _fail(self, group: list, error: BaseException) -> None:
        self.stats["errors"] += 1
        for job in group:
            if not job.done.is_set():
                job.error = error
                job.done.set()

    def _run_images(self, jobs: list[ImageJob]) -> None:
        from mllm.generation import generate_images

        prompts, seeds = [], []
        for job in jobs:
            base = job.seed if job.seed is not None else random.randrange(2**31 - 1 - job.n)
            prompts += [job.prompt] * job.n
            seeds += [base + k for k in range(job.n)]
        codes = generate_images(self.model.model, prompts, 1, jobs[0].guidance_scale, seed=seeds,
                                decoding=jobs[0].decoding)
        images = self.model.model.vision_tokenizer.decode_images(torch.stack([c[0] for c in codes]))
        start = 0
        for job in jobs:
            job.result = images[start:start + job.n]
            start += job.n
            job.done.set()

    def _run_edits(self, jobs: list[EditJob]) -> None:
        """One `edit_images` call for the group: one row per edited image (its source repeated), seeded per
        image as `MLLM.edit` seeds it (edit k of a job: its seed + k)."""
        from mllm.generation import edit_images

        images, instructions, seeds = [], [], []
        for job in jobs:
            base = job.seed if job.seed is not None else random.randrange(2**31 - 1 - job.n)
            images += [job.image] * job.n
            instructions += [job.prompt] * job.n
            seeds += [base + k for k in range(job.n)]
        first = jobs[0]
        codes = edit_images(self.model.model, images, instructions, 1, first.guidance_scale, first.guidance,
                            seed=seeds, decoding=first.decoding, image_guidance_scale=first.image_guidance_scale)
        edited = self.model.model.vision_tokenizer.decode_images(torch.stack([c[0] for c in codes]))
        start = 0
        for job in jobs:
            job.result = edited[start:start + job.n]
            start += job.n
            job.done.set()

    def _run_chat(self, jobs: list[ChatJob]) -> None:
        from transformers import StoppingCriteriaList

        from mllm.generation import (
            _encode_prompts,
            _end_of_reply_ids,
            _finish_text,
            _generate_ids,
            _ImageStart,
            chat,
            edit_order,
        )

        model = self.model.model
        config = model.config
        ends = _end_of_reply_ids(model)
        rows = [(job, choice) for job in jobs for choice in range(job.n)]
        conversations = [job.messages for job, _ in rows]
        batch = _encode_prompts(model, conversations)
        lengths = batch["attention_mask"].sum(-1).tolist()
        room = model.context_length - batch["input_ids"].shape[1]
        budgets = [min(job.max_tokens or self.default_max_tokens, room) for job, _ in rows]
        for (job, _), length in zip(rows, lengths):
            job.prompt_tokens = int(length)
        first = jobs[0]
        # A seeded job runs alone (see _groups), in a scope that restores the global RNG before its job is
        # marked done.
        with _scoped_seed(first.seed, model.device):
            streamer = _RowStreamer(model, [job.on_delta for job, _ in rows], [choice for _, choice in rows], first.stop)
            limits = _RowLimits(budgets, [job.cancelled for job, _ in rows], batch["input_ids"].shape[1])
            # The reply's first token on a turn of an image then text: `config.chat_image_threshold`, as in chat.
            floors = [config.chat_image_threshold if edit_order(job.messages) is not None else None for job, _ in rows]
            starts = [_ImageStart(config.boi_token_id, batch["input_ids"].shape[1], floors)] if any(
                floor is not None for floor in floors) else None
            new_ids = _generate_ids(model, batch["input_ids"], batch["attention_mask"], max(budgets), first.temperature,
                                    None, first.top_p, first.stop, stop_ids=[*ends, config.boi_token_id],
                                    allow_boi=True, streamer=streamer, stopping_criteria=StoppingCriteriaList([limits]),
                                    logits_processors=starts)
            results: dict[int, list] = {id(job): [None] * job.n for job in jobs}
            for row, ((job, choice), ids, budget) in enumerate(zip(rows, new_ids, budgets)):
                if job.cancelled.is_set():
                    results[id(job)][choice] = None
                    continue
                if ids and ids[-1] == config.boi_token_id:  # the model starts drawing: finish this row alone
                    # continues from the row's own ids, so the reply begins with the text already streamed
                    reply = chat(model, job.messages, max_new_tokens=budget, temperature=job.temperature,
                                 top_p=job.top_p, stop=job.stop or None, seed=job.seed,
                                 guidance_scale=job.guidance_scale, reply_prefix=ids, decoding=job.decoding)
                    images, text = reply["images"], reply["text"]
                    # the reply's own count: its prefix `ids` ends with a <|boi|> that chat drops when the image
                    # does not fit the budget (then the reply is text, often to the budget: "length")
                    tokens, finish = reply["completion_tokens"], reply["finish_reason"]
                    streamed = streamer.text(row)
                    if job.on_delta is not None and text.startswith(streamed) and len(text) > len(streamed):
                        job.on_delta(choice, text[len(streamed):])
                else:
                    text, images, tokens = _finish_text(model, ids, job.stop), [], len(ids)
                    finished = bool(ids) and ids[-1] in ends
                    stopped = any(s in model.processor.decode_text(ids) for s in job.stop)
                    finish = "stop" if finished or stopped else "length"
                results[id(job)][choice] = {"text": text, "images": images, "finish_reason": finish,
                                            "completion_tokens": tokens}
        for job in jobs:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                job.error = Cancelled()
            else:
                job.result = results[id(job)]
            job.done.set()


@contextlib.contextmanager
def _scoped_seed(seed: int | None, device) -> Iterator[None]:
    """Seed torch's global RNG (CPU and the model's GPU) inside the block and restore its state after:
    `generate` samples from the global RNG, and a request's seed must not decide what later requests get."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _rows(job) -> int:
    return job.n


def _key(job) -> tuple:
    if isinstance(job, ImageJob):
        return ("image", job.guidance_scale, job.decoding)  # one generate_images call: one of each
    if isinstance(job, EditJob):
        # one edit_images call: one of each
        return ("edit", job.guidance_scale, job.guidance, job.image_guidance_scale, job.decoding)
    if job.seed is not None:
        return ("seeded", id(job))  # its own RNG stream: never shares a batch
    if job.temperature == 0:
        return ("greedy", tuple(job.stop))
    return ("sampled", job.temperature, job.top_p, tuple(job.stop))


def _groups(jobs: list, max_batch: int) -> list[list]:
    """Jobs that can share a forward pass, in arrival order, each group at most `max_batch` rows."""
    groups: dict[tuple, list[list]] = {}
    order: list[list] = []
    for job in jobs:
        chunks = groups.setdefault(_key(job), [])
        if not chunks or sum(_rows(j) for j in chunks[-1]) + _rows(job) > max_batch:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(job)
    return order


class _RowLimits:
    """Stopping criterion: row r is done after budgets[r] new tokens, or once its job is cancelled."""

    def __init__(self, budgets: list[int], cancelled: list[threading.Event], prompt_length: int) -> None:
        self.budgets = torch.tensor(budgets)
        self.cancelled, self.prompt_length = cancelled, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        produced = input_ids.shape[1] - self.prompt_length
        done = self.budgets.to(input_ids.device) <= produced
        flags = torch.tensor([event.is_set() for event in self.cancelled], device=input_ids.device)
        return done | flags


class _RowStreamer:
    """transformers streamer for a batch: after the prompt, each `put` brings one new id per row; the
    row's newly decodable text goes to its job's `on_delta(choice, text)`; an id that ends the reply (end of
    turn, eos, <|boi|>) ends the row's stream. Text is decoded from the row's
    ids so far (multi-token characters come out whole; image ids and special tokens decode to nothing),
    cut at the first stop string, and the last len(longest stop) - 1 characters are held back until the
    row ends, so a stop string is never sent in part. Text is also held while the row's last text id is a
    byte-fallback token (`<0x..>`): a run of byte tokens decodes as one UTF-8 sequence, and a later byte can
    turn bytes already decoded into replacement characters, so a run is sent once it has ended."""

    def __init__(self, model, callbacks: list, choices: list[int], stop: list[str]) -> None:
        from mllm.generation import _end_of_reply_ids

        self.model, self.callbacks, self.choices, self.stop = model, callbacks, choices, list(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[list[int]] = [[] for _ in callbacks]
        self.sent: list[str] = ["" for _ in callbacks]
        self.finished = [False for _ in callbacks]
        self.prompt_seen = False
        self.byte_ids = _byte_token_ids(model.processor.text_tokenizer)
        self.ends = frozenset([*_end_of_reply_ids(model), model.config.boi_token_id])

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[row]:
                continue
            if token in self.ends:
                self._flush(row, final=True)
                continue
            self.ids[row].append(token)
            self._flush(row, final=False)

    def end(self) -> None:
        for row in range(len(self.callbacks)):
            if not self.finished[row]:
                self._flush(row, final=True)

    def _flush(self, row: int, final: bool) -> None:
        if final:
            self.finished[row] = True
        if self.callbacks[row] is None:
            return
        text = self.model.processor.decode_text(self.ids[row]).lstrip()
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
            self.finished[row] = True
        if not final:
            offset = self.model.config.image_offset
            last_text_id = next((i for i in reversed(self.ids[row]) if i < offset), None)
            if text.endswith("\ufffd") or last_text_id in self.byte_ids:
                return
            text = text[: len(text) - self.holdback] if self.holdback else text
        if final:
            text = text.rstrip()
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.callbacks[row](self.choices[row], text[len(self.sent[row]):])
            self.sent[row] = text

    def text(self, row: int) -> str:
        return self.sent[row]


@functools.lru_cache(maxsize=8)
def _byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of a tokenizer's byte-fallback tokens (`<0x00>` ... `<0xFF>`); computed once per tokenizer, not per
    batch (reading the vocabulary of a real LLM's tokenizer builds a dict of 100k+ entries)."""
    return frozenset(i for token, i in tokenizer.get_vocab().items()
                     if len(token) == 6 and token.startswith("<0x") and token.endswith(">"))


__all__ = ["Cancelled", "ChatJob", "EditJob", "Engine", "ImageJob", "QueueFull", "Reservation"]
