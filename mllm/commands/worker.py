"""A warm worker for the one-shot model commands (`mllm ask`, `caption`, `draw`, `edit`).

Importing torch and transformers' model code takes about 4 s of a one-shot command on a small CPU
machine, whatever the size of the model; the model itself loads in a fraction of that. So these
commands hand their arguments to a per-user background process that keeps the imports and the loaded
models warm:

* the first call starts the worker (`python -m mllm.commands.worker`) and waits for its answer; later calls
  connect to it and take well under a second plus the generation itself;
* the worker runs the very same `run(args)` of the command, in the caller's working directory, and
  streams its stdout and stderr back; the exit code and the one-line user errors are the caller's;
* it keeps each model folder it loaded (reloaded when a file in it changes) and exits after
  `MLLM_WORKER_IDLE` seconds (default 300) without a request;
* one worker per user, Python, project version and environment that matters (devices, threads,
  Hugging Face settings): code changed since it started means another worker, never stale answers;
* it listens on a Unix socket in a private folder (mode 700, owned by the user:
  `$XDG_RUNTIME_DIR/mllm` or `/tmp/mllm-<uid>`); requests are JSON, never pickles.

`MLLM_WORKER=0` (or `--no-worker`) runs the command in its own process, as does any platform without
Unix sockets. If the worker cannot start or dies mid-request, the command runs in its own process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The commands a worker runs: one model call each, no stdin.
WORKER_COMMANDS = ("ask", "caption", "draw", "edit")
DEFAULT_IDLE_SECONDS = 300.0
PROTOCOL = 1
# Environment that changes what a command computes or where: a worker started under other values is
# another worker.
_KEY_ENV = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "PYTHONPATH", "MLLM_TRACEBACK", "HF_HUB_DISABLE_PROGRESS_BARS")
_PACKAGES = ("mllm", "tokenizer_vision")
_START_TIMEOUT = 60.0  # seconds for a new worker to bind its socket (it binds before importing torch)
_MAX_FRAME = 64 * 1024 * 1024


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or failed before answering: run the command in this process."""


# ----------------------------------------------------------------------------------- both sides
def enabled() -> bool:
    return os.environ.get("MLLM_WORKER", "1").strip().lower() not in ("0", "false", "no", "off") and hasattr(
        socket, "AF_UNIX"
    )


def runtime_dir() -> Path:
    """The user's private folder for worker sockets (created 700; refused if others can enter it)."""
    override = os.environ.get("MLLM_WORKER_DIR")
    if override:
        folder = Path(override)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "mllm"
    else:
        folder = Path("/tmp") / f"mllm-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerUnavailable(f"{folder} is not private to this user")
    return folder


def _code_stamp() -> str:
    """Changes whenever a source file of the project changes (mtime and size of every .py file)."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        root = Path(__file__).resolve().parents[2] / package
        for path in sorted(root.rglob("*.py")):
            info = path.stat()
            digest.update(f"{path}:{info.st_mtime_ns}:{info.st_size};".encode())
    return digest.hexdigest()


def worker_key() -> str:
    parts = [str(PROTOCOL), sys.executable, sys.version, _code_stamp()]
    parts += [f"{name}={os.environ.get(name, '')}" for name in _KEY_ENV]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    conn.sendall(struct.pack(">I", len(data)) + data)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(conn: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", _receive_exactly(conn, 4))
    if size > _MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes refused")
    message = json.loads(_receive_exactly(conn, size))
    if not isinstance(message, dict):
        raise ConnectionError("malformed frame")
    return message


# ------------------------------------------------------------------------------------ the client
def run_in_worker(argv: list[str], stdout=None, stderr=None) -> int:
    """Run `mllm <argv>` in the warm worker (starting it if needed); its output is written here as it comes.

    Raises WorkerUnavailable when the worker cannot take the request; nothing has been printed then."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    folder = runtime_dir()
    key = worker_key()
    conn = _connect_or_start(folder, key)
    with conn:
        try:
            _send(conn, {"protocol": PROTOCOL, "argv": argv, "cwd": os.getcwd()})
            started = False
            while True:
                message = _receive(conn)
                kind = message.get("type")
                if kind == "output":
                    started = True
                    (stdout if message.get("stream") == "stdout" else stderr).write(message.get("data", ""))
                    (stdout if message.get("stream") == "stdout" else stderr).flush()
                elif kind == "exit":
                    return int(message.get("code", 1))
                elif kind == "refused" and not started:
                    raise WorkerUnavailable(str(message.get("reason", "refused")))
                else:
                    raise ConnectionError(f"unexpected frame {kind!r}")
        except (OSError, ValueError) as error:
            if started:  # part of the output is out: rerunning would print it twice
                stderr.write(f"\nmllm: the worker stopped mid-answer ({error}); run again with MLLM_WORKER=0\n")
                return 1
            raise WorkerUnavailable(str(error)) from error


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError as error:
        conn.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise WorkerUnavailable(f"cannot reach the worker: {error}") from error
    return conn


def _connect_or_start(folder: Path, key: str) -> socket.socket:
    path = folder / f"{key}.sock"
    conn = _connect(path)
    if conn is not None:
        return conn
    import fcntl

    # One starter at a time: concurrent first calls share the worker the first of them starts.
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a worker that was killed
        with open(folder / f"{key}.log", "wb") as log:  # the worker's own messages (warnings, crashes)
            process = subprocess.Popen(
                [sys.executable, "-m", "mllm.commands.worker", "--socket", str(path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if process.poll() is not None:
                raise WorkerUnavailable(f"the worker exited at start (see {folder / f'{key}.log'})")
            time.sleep(0.02)
        process.kill()
        raise WorkerUnavailable("the worker did not start in time")


# ------------------------------------------------------------------------------------ the worker
class _Stream(io.TextIOBase):
    """A text stream whose writes go to the client as output frames."""

    def __init__(self, conn: socket.socket, name: str) -> None:
        self.conn, self.name = conn, name

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if text:
            _send(self.conn, {"type": "output", "stream": self.name, "data": text})
        return len(text)


class ModelCache:
    """Loaded models by (folder, adapter, device, dtype), each reloaded when a file of its folders changed."""

    def __init__(self) -> None:
        self._models: dict[tuple, tuple[tuple, Any]] = {}

    @staticmethod
    def _stamp(*folders: Path | None) -> tuple:
        stamp = []
        for folder in folders:
            if folder is None:
                continue
            for path in sorted(Path(folder).rglob("*")):
                with contextlib.suppress(OSError):
                    info = path.stat()
                    stamp.append((str(path), info.st_mtime_ns, info.st_size))
        return tuple(stamp)

    def get(self, model_dir: Path, adapter: Path | None, device: str, dtype: str | None,
            load: Callable[[], Any]) -> Any:
        model_dir = Path(model_dir).resolve()
        adapter = Path(adapter).resolve() if adapter is not None else None
        key = (str(model_dir), str(adapter), device, dtype)
        stamp = self._stamp(model_dir, adapter)
        cached = self._models.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self._models.pop(key, None)
        model = load()
        self._models[key] = (stamp, model)
        return model


# Set in the worker process: `mllm.commands._common.load_model` keeps models here.
MODELS: ModelCache | None = None


@contextlib.contextmanager
def _in_folder(cwd: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(previous)


def _serve_one(conn: socket.socket) -> None:
    from mllm import cli

    request = _receive(conn)
    argv = request.get("argv")
    if request.get("protocol") != PROTOCOL or not isinstance(argv, list) or not argv or argv[0] not in WORKER_COMMANDS:
        _send(conn, {"type": "refused", "reason": "not a worker request"})
        return
    out, err = _Stream(conn, "stdout"), _Stream(conn, "stderr")
    code = 1
    try:
        with _in_folder(str(request.get("cwd") or "/")), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(part) for part in argv], use_worker=False)
            except SystemExit as stop:  # argparse
                code = stop.code if isinstance(stop.code, int) else 2
            except Exception:  # noqa: BLE001 -- a bug: its traceback goes to the caller, as it would in its own process
                import traceback

                traceback.print_exc()
                code = 1
    except FileNotFoundError as error:  # the caller's folder is gone
        err.write(f"mllm {argv[0]}: error: {error}\n")
        code = 2
    _send(conn, {"type": "exit", "code": code})


def serve(socket_path: str, idle_seconds: float) -> None:
    """Bind first (callers may connect and wait while torch imports), then answer requests one at a time."""
    global MODELS
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file: owner only
    try:
        listener.bind(socket_path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.settimeout(idle_seconds)
    pid_file = Path(socket_path).with_suffix(".pid")
    pid_file.write_text(f"{os.getpid()}\n")
    MODELS = ModelCache()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Warm the imports every command needs while the first caller's request waits in the backlog.
    import mllm.api
    import mllm.model  # noqa: F401

    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                break
            _answer(conn)
        # Idle: new callers start a new worker from now on; the ones already queued are still answered.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
            pid_file.unlink()
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            _answer(conn)
    finally:
        # A worker started after this one went idle owns these paths now: remove only what is still ours.
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
        listener.close()


def _answer(conn: socket.socket) -> None:
    with conn:
        conn.setblocking(True)
        with contextlib.suppress(OSError, ValueError):  # a caller that went away
            _serve_one(conn)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mllm.commands.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--idle", type=float, default=float(os.environ.get("MLLM_WORKER_IDLE", DEFAULT_IDLE_SECONDS)),
                        help="exit after this many seconds without a request")
    args = parser.parse_args(argv)
    serve(args.socket, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
