"""A chat with a model in the terminal (`mllm chat --model DIR`).

Reads one line at a time from stdin (with a prompt and line editing on a terminal; plain lines from
a pipe, so a script can drive it). Commands:

    /image PATH [PATH ...]  attach images to the next message (checked right away; quote a path with
                   spaces, or give it alone); /image again attaches more: one message may hold several images
    /draw PROMPT   ask for a drawing (the config's draw template, "Draw: PROMPT"); the reply is an image
    /edit INSTRUCTION  edit the attached image, else the conversation's last image (a drawing, an edit or an
                   image sent earlier), with the edit settings (`MLLM.edit`); the reply is the edited image
    /reset         forget the conversation (and any attached images)
    /help          list the commands
    /quit          leave (so do end of input and Ctrl-C at the prompt)

Any other line is a message (attached images first, in the order attached, then the text; `//text` sends
"/text"). A message of an image and an instruction ("make the circle blue") is an edit request the model
answers with an image, as it answers "Draw: ..." (through `chat`, with the drawing settings; /edit uses the
edit settings). Replies go to stdout as `assistant> TEXT`, followed by `[image saved: PATH]` for each image
the assistant drew (PNG files under --save-dir, never overwriting a file); notes and errors go to stderr. The
conversation keeps every turn, images included, until /reset; when it no longer fits the model's
context the oldest turns are dropped (a system message stays) and a note says so.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mllm.config import (
    DEFAULT_DECODING,
    DRAW_GUIDANCE_SCALE,
    DRAW_TEMPERATURE,
    EDIT_GUIDANCE,
    EDIT_TEMPERATURE,
)

Message = dict[str, Any]

HELP = """commands:
  /image PATH [PATH ...]  attach images to your next message (quote paths with spaces)
  /draw PROMPT   ask the model to draw PROMPT; the image is saved under --save-dir
  /edit INSTRUCTION  edit the attached image (else the last image of the conversation),
                 e.g. /edit make the circle blue; the edited image is saved under --save-dir
  /reset         forget the conversation (and attached images)
  /help          this list
  /quit          leave (also: end of input, Ctrl-C)
anything else is sent as your message, with the images attached (//text sends a line that starts with /)"""


@dataclass
class ChatOptions:
    """How a terminal chat samples and where it saves drawn images (the options of `mllm chat`)."""

    save_dir: Path = Path("mllm-chat-images")
    system: str | None = None  # system message opening the conversation
    max_new_tokens: int = 256
    temperature: float = 0.0  # of text; 0 decodes greedily
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    guidance_scale: float = DRAW_GUIDANCE_SCALE  # of drawn images
    image_temperature: float = DRAW_TEMPERATURE
    decoding: str = DEFAULT_DECODING  # of drawn images: "jacobi" or "sequential" (same distribution)
    edit_guidance_scale: float | None = None  # of /edit (None: the model's own, `config.edit_guidance_scale`)
    edit_guidance: str = EDIT_GUIDANCE  # of /edit: what guidance's unconditional branch drops
    edit_temperature: float = EDIT_TEMPERATURE  # of /edit


# ---------------------------------------------------------------------------- messages
def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(image) -> dict[str, Any]:
    return {"type": "image", "image": image}


def user_message(text: str, images: list | tuple = ()) -> Message:
    """A user turn: the attached images first (the order of the training samples), then the text."""
    return {"role": "user", "content": [image_part(image) for image in images] + [text_part(text)]}


def assistant_message(text: str, images: list | tuple = ()) -> Message:
    """An assistant turn: its text, then the images it drew (a drawing alone is just the images)."""
    content = [text_part(text)] if text or not images else []
    return {"role": "assistant", "content": content + [image_part(image) for image in images]}


def system_messages(system: str | None) -> list[Message]:
    return [{"role": "system", "content": [text_part(system)]}] if system else []


def count_images(messages: list[Message]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") in ("image", "image_url")
    )


def prompt_length(processor, messages: list[Message]) -> int:
    """Tokens of `messages` as a generation prompt, images included, without encoding any image: the
    rendered text (each image one <|image|> token) plus the rest of each image's span."""
    text = processor.render(messages, add_generation_prompt=True)
    ids = processor.text_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return len(ids) + count_images(messages) * (processor.vocab.tokens_per_image - 1)


def fit_history(
    messages: list[Message], length: Callable[[list[Message]], int], limit: int
) -> tuple[list[Message], int]:
    """Drop the oldest turns until `length(messages) <= limit` -> (kept messages, turns dropped).

    A turn is a user message with the messages after it up to the next user message. Leading system
    messages are always kept, and so is the last turn (the one being answered) even when it alone is
    too long: the model then says what is wrong.
    """
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    system, rest = messages[:start], list(messages[start:])
    dropped = 0
    while length(system + rest) > limit:
        users = [i for i, message in enumerate(rest) if message["role"] == "user"]
        if len(users) < 2:
            break
        rest = rest[users[1] :]  # the first turn goes (an assistant opening, if any, with it)
        dropped += 1
    return system + rest, dropped


def image_paths(argument: str) -> list[Path] | None:
    """The paths of `/image ARGUMENT`: the whole argument when it names an existing file (a path with
    spaces needs no quotes when it is alone), else the shell-like words of it ("a b.png" c.png); None for
    unbalanced quotes."""
    argument = argument.strip()
    whole = argument[1:-1] if len(argument) >= 2 and argument[0] == argument[-1] and argument[0] in "'\"" else argument
    if whole and Path(whole).expanduser().exists():
        return [Path(whole).expanduser()]
    try:
        words = shlex.split(argument)
    except ValueError:
        return None
    return [Path(word).expanduser() for word in words]


# ---------------------------------------------------------------------------- files
def session_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def save_images(images, save_dir: Path, stamp: str, turn: int) -> list[Path]:
    """Write `images` as PNG files `chat-<stamp>-<turn>-<k>.png` under `save_dir`; a name that is
    taken gets a suffix (the files are created exclusively, so nothing is ever overwritten)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        base = f"chat-{stamp}-{turn}-{k}"
        for attempt in range(10_000):
            path = save_dir / (f"{base}.png" if attempt == 0 else f"{base}-{attempt}.png")
            try:
                handle = open(path, "xb")  # noqa: SIM115 (exclusive creation; closed just below)
            except FileExistsError:
                continue
            try:
                with handle:
                    image.save(handle, format="PNG")
            except BaseException:
                path.unlink(missing_ok=True)  # our own half-written file
                raise
            paths.append(path)
            break
        else:
            raise OSError(f"no free file name for {base}.png in {save_dir}")
    return paths


# ---------------------------------------------------------------------------- drawing
def draw_images(model, messages: list[Message], guidance_scale: float, seed: int | None,
                temperature: float = DRAW_TEMPERATURE, decoding: str = DEFAULT_DECODING) -> list:
    """The assistant's reply to a drawing request: one image sampled right after `<|boi|>` at the end
    of the conversation (what the model was trained to answer "Draw: ..." with), CFG against the
    unconditional draw prompt, decoded with `decoding` ("auto", "jacobi" or "sequential"). -> [PIL image]."""
    import torch

    from mllm.generation import sample_image_codes

    core = model.model
    config = core.config
    boi = torch.tensor([config.boi_token_id], device=core.device)

    def prefix(conversation):
        batch = core.processor(conversation, add_generation_prompt=True, max_length=core.context_length)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        return torch.cat([ids.to(core.device), boi])

    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    with torch.no_grad():
        core.eval()
        core.sync_image_embeddings()  # codebook mode: the cached decode reads image rows by id
        unconditional = None
        if guidance_scale != 1.0:
            unconditional = prefix(core.processor.unconditional_draw_conversation())
        codes = sample_image_codes(
            core, [prefix(messages)], unconditional, guidance_scale, temperature, None, None, [seed],
            decoding=decoding,
        )
    return list(core.vision_tokenizer.decode_images(codes.cpu()))


# ---------------------------------------------------------------------------- the session
class ChatSession:
    """The conversation and the commands; `handle(line)` runs one input line (False: leave)."""

    def __init__(
        self,
        model,
        options: ChatOptions,
        out: TextIO | None = None,
        err: TextIO | None = None,
        stamp: str | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stamp = stamp or session_stamp()
        self.system = system_messages(options.system)
        self.history: list[Message] = list(self.system)
        self.pending: list = []
        self.turn = 0  # assistant turns so far (never reset: it names the saved images)

    # -- output
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def fail(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)

    # -- input
    def handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if line.startswith("//"):
            return self.send(line[1:])
        if not line.startswith("/"):
            return self.send(line)
        command, _, argument = line[1:].partition(" ")
        command, argument = command.lower(), argument.strip()
        if command in ("quit", "exit"):
            return False
        if command == "help":
            self.say(HELP)
        elif command == "reset":
            self.reset()
        elif command == "image":
            self.attach(argument)
        elif command == "draw":
            if not argument:
                self.fail("/draw needs a prompt, e.g. /draw a red circle")
            else:
                return self.send(self.model.config.draw_template.format(prompt=argument), draw=True)
        elif command == "edit":
            if not argument:
                self.fail("/edit needs an instruction, e.g. /edit make the circle blue")
            else:
                return self.edit(argument)
        else:
            self.fail(f"unknown command /{command}")
            self.note(HELP)
        return True

    def reset(self) -> None:
        self.history = list(self.system)
        self.pending = []
        self.note("[conversation cleared]")

    def attach(self, argument: str) -> None:
        """/image PATH [PATH ...]: every image is checked first; one that cannot be read attaches none."""
        paths = image_paths(argument)
        if paths is None:
            self.fail(f"/image: unbalanced quotes in {argument!r} (quote each path: /image \"a b.png\" c.png)")
            return
        if not paths:
            self.fail("/image needs a path, e.g. /image photo.png (several: /image a.png b.png)")
            return
        images = []
        for path in paths:
            image = self.read_image(path)
            if image is None:
                if len(paths) > 1:
                    self.note("[no image attached]")
                return
            images.append(image)
        self.pending += images
        for path, image in zip(paths, images):
            self.note(
                f"[image attached: {path} ({image.width}x{image.height}); "
                f"{len(self.pending)} waiting for your next message]"
            )

    def read_image(self, path: Path):
        """The image at `path` (RGB, checked), or None after saying why not."""
        if not path.is_file():
            self.fail(f"image {path} does not exist" if not path.exists() else f"{path} is not a file")
            return None
        try:
            return self.model.model.processor.load_image(path)
        except (ValueError, OSError) as exn:
            self.fail(f"cannot read image: {exn}")
            return None

    def last_image(self):
        """The last image of the conversation (drawn, edited or sent), or None."""
        for message in reversed(self.history):
            images = [part["image"] for part in message["content"] if part.get("type") == "image"]
            if images:
                return images[-1]
        return None

    # -- a turn
    def send(self, text: str, draw: bool = False) -> bool:
        message = user_message(text, self.pending)
        self.pending = []
        before = self.history
        self.history = self.history + [message]
        try:
            self.fit(draw)
            if draw:
                images = draw_images(self.model, self.history, self.options.guidance_scale, self.seed(),
                                     self.options.image_temperature, self.options.decoding)
                reply = {"text": "", "images": images}
            else:
                reply = self.model.chat(self.history, **self.chat_options())
        except ValueError as exn:
            self.history = before
            self.fail(str(exn))
            return True
        except KeyboardInterrupt:
            self.history = before
            self.note("[interrupted]")
            return True
        self.answer(reply)
        return True

    def edit(self, instruction: str) -> bool:
        """/edit: the attached image (exactly one), else the conversation's last image, edited by `MLLM.edit`.
        The turn joins the conversation: the user's instruction (with the attached image, if any), then the
        edited image, so a next /edit edits the edit."""
        if len(self.pending) > 1:
            self.fail(f"/edit edits one image, and {len(self.pending)} are attached (/reset clears them)")
            return True
        source = self.pending[0] if self.pending else self.last_image()
        if source is None:
            self.fail("/edit needs an image: attach one with /image PATH (or draw one with /draw PROMPT)")
            return True
        message = user_message(instruction, self.pending)
        self.pending = []
        options = self.options
        try:
            images = self.model.edit(source, instruction, seed=self.seed(), guidance_scale=options.edit_guidance_scale,
                                     guidance=options.edit_guidance, temperature=options.edit_temperature,
                                     decoding=options.decoding)
        except ValueError as exn:
            self.fail(str(exn))
            return True
        except KeyboardInterrupt:
            self.note("[interrupted]")
            return True
        self.history = self.history + [message]
        self.answer({"text": "", "images": images})
        return True

    def answer(self, reply: dict[str, Any]) -> None:
        """The assistant's turn: kept in the conversation, its text printed and its images saved."""
        self.turn += 1
        images = list(reply["images"])
        self.history.append(assistant_message(reply["text"], images))
        self.say(f"assistant> {reply['text']}")
        if images:
            try:
                paths = save_images(images, self.options.save_dir, self.stamp, self.turn)
            except OSError as exn:
                self.fail(f"cannot save the image: {exn}")
            else:
                for path in paths:
                    self.say(f"[image saved: {path}]")

    def fit(self, draw: bool) -> None:
        """Drop the oldest turns when the conversation plus room for the reply exceeds the context."""
        core = self.model.model
        context = core.context_length
        if draw:
            room = core.config.image_tokens_per_image + 2  # <|boi|>, the codes, <|eoi|>
        else:
            room = min(self.options.max_new_tokens, context // 4)
        kept, dropped = fit_history(self.history, lambda m: prompt_length(core.processor, m), context - room)
        if dropped:
            self.history = kept
            self.note(
                f"[the conversation outgrew the context of {context} tokens: dropped the "
                f"{'oldest turn' if dropped == 1 else f'{dropped} oldest turns'}]"
            )

    def seed(self) -> int | None:
        return None if self.options.seed is None else self.options.seed + self.turn

    def chat_options(self) -> dict[str, Any]:
        options = self.options
        return {
            "max_new_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "seed": self.seed(),
            "guidance_scale": options.guidance_scale,
            "image_temperature": options.image_temperature,
            "decoding": options.decoding,
        }


# ---------------------------------------------------------------------------- the loop
def input_lines(stream: TextIO | None = None) -> Iterator[str]:
    """Lines typed at a terminal (prompt "you> ", line editing and history when readline exists), or
    the lines of a pipe / file as they arrive."""
    stream = stream or sys.stdin
    if stream is sys.stdin and stream.isatty():
        try:
            import readline  # noqa: F401 (input() gains line editing and history)
        except ImportError:
            pass
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        yield from iter(stream.readline, "")


def converse(session: ChatSession, lines: Iterator[str]) -> None:
    """Feed `lines` to the session until /quit, the end of the lines or Ctrl-C at the prompt."""
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except KeyboardInterrupt:
            print(file=session.err)
            return
        try:
            if not session.handle(line):
                return
        except KeyboardInterrupt:
            session.note("[interrupted]")
