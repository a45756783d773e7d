"""Atomic, durable saves: write aside, fsync, rename into place; the old copy goes only once the new one is in.

A save killed at any instant (SIGKILL, power loss) leaves under the target's name either the previous
complete copy or the new complete copy, never a half-written one:

    file    write `.NAME.tmp` beside NAME -> fsync it -> rename it onto NAME -> fsync the folder
    folder  write `.NAME.tmp/` beside NAME -> fsync every file and folder in it
            -> [rename NAME -> `.NAME.old`] -> rename `.NAME.tmp` -> NAME -> fsync the parent
            -> delete `.NAME.old`

Between the two renames of a folder replacement, NAME is briefly absent and the previous copy sits at
`.NAME.old`. `recover_dir(NAME)` undoes whatever a killed save left behind: a `.NAME.old` without NAME
is moved back (the previous copy, complete), one beside NAME is deleted, and a `.NAME.tmp` (possibly
incomplete) is deleted. `write_dir` recovers its target before it starts; code that starts from a folder
a killed save may have been replacing (a resume, a "trained already?" check) calls `recover_dir` (one
folder) or `recover_leftovers` (everything in a parent) first.

A saved folder's files and folders get the permissions the user's umask gives (`fsync_tree`: 644 / 755
under umask 022, 664 / 775 under 002), whatever a writer inside chose (safetensors writes 0600).

Logs are appended line by line (JSON lines, e.g. `metrics.jsonl`), so a kill can cut the last line short.
`parse_jsonl` / `read_jsonl` / `rewrite_jsonl` drop such a torn line (and any other line that is not a JSON
object) instead of failing: a torn log never stops a resume.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def aside(target: str | os.PathLike, suffix: str) -> Path:
    """The hidden sibling `.NAME{suffix}` a save of `target` writes to (`.tmp`) or moves the old copy to (`.old`)."""
    target = Path(target)
    return target.with_name(f".{target.name}{suffix}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's (its entries') data to disk. Folders are skipped where the OS cannot."""
    directory = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # e.g. Windows cannot open a folder
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and folder under `root` (bottom up), and `root` itself, each first given the
    permissions the user's umask gives a new one (`umask_mode`).

    Every save finishes here, and some writers create their output private whatever the umask: safetensors
    >= 0.8 writes weights 0600 through a temporary file, `tempfile.mkdtemp` makes 0700 folders. A saved
    model must be as readable as any other file its user creates (a shared group, a server user)."""
    umask = current_umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                _settle_mode(path, umask)
                fsync_path(path)
        _settle_mode(folder, umask)
        fsync_path(folder)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status); the
    fallback sets and restores it, which other threads could observe for an instant."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(is_dir: bool, executable: bool = False, umask: int | None = None) -> int:
    """The permission bits a new folder (0777) or file (0666; 0777 when executable) gets under `umask`
    (default: the process's)."""
    umask = current_umask() if umask is None else umask
    return (0o777 if is_dir or executable else 0o666) & ~umask


def _settle_mode(path: str, umask: int) -> None:
    """Give `path` the permission bits `umask_mode` says (setuid / setgid / sticky bits kept: a setgid
    folder of a shared group stays one). Where the file system has no such permissions, nothing changes."""
    try:
        mode = os.lstat(path).st_mode
        want = umask_mode(stat.S_ISDIR(mode), bool(mode & 0o111), umask)
        if stat.S_IMODE(mode) & 0o777 != want:
            os.chmod(path, (stat.S_IMODE(mode) & 0o7000) | want)
    except OSError:
        pass


def write_file(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically and durably (`.NAME.tmp`, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = aside(path, TMP_SUFFIX)
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on `.NAME.tmp` beside `target`, make it durable, and swap it in for `target`.

    `target` (replaced if it exists) holds either its previous content or all of what `write` wrote,
    whatever instant the process dies at. An exception from `write` removes the partial folder and
    leaves `target` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp, old = aside(target, TMP_SUFFIX), aside(target, OLD_SUFFIX)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if os.path.lexists(target):
            os.rename(target, old)
            fsync_path(target.parent)
        os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        recover_dir(target)  # puts the previous copy back if the swap stopped between its renames
        raise
    if os.path.lexists(old):
        _remove(old)
        fsync_path(target.parent)
    return target


def recover_dir(target: str | os.PathLike) -> None:
    """Undo what a killed `write_dir(target)` left: restore `.NAME.old` if NAME is missing, else delete it;
    delete `.NAME.tmp`."""
    target = Path(target)
    tmp, old = aside(target, TMP_SUFFIX), aside(target, OLD_SUFFIX)
    if os.path.lexists(old):
        if os.path.lexists(target):
            _remove(old)
        else:
            os.rename(old, target)
        fsync_path(target.parent)
    if os.path.lexists(tmp):
        _remove(tmp)


def recover_leftovers(parent: str | os.PathLike) -> None:
    """`recover_dir` for every save under `parent` that left a `.NAME.tmp` or `.NAME.old` behind
    (a leftover `.NAME.tmp` file of `write_file` is deleted too)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        name = entry.name
        for suffix in (TMP_SUFFIX, OLD_SUFFIX):
            leftover = name.startswith(".") and name.endswith(suffix) and len(name) > 1 + len(suffix)
            if leftover and os.path.lexists(entry):  # not already handled through its sibling
                recover_dir(parent / name[1 : -len(suffix)])


def parse_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, dict]], list[int]]:
    """A JSON-lines log -> ([(line, record)] of the lines holding a JSON object, [1-based numbers of the
    lines dropped]). Blank lines are ignored; a line that does not parse to an object is dropped, which is
    what a write cut short by a kill leaves as the last line."""
    entries, dropped = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle.read().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                entries.append((line, record))
            else:
                dropped.append(number)
    return entries, dropped


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log, a torn (unparseable) line left out (`parse_jsonl`)."""
    return [record for _, record in parse_jsonl(path)[0]]


def rewrite_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool] | None = None) -> list[int]:
    """Rewrite a JSON-lines log (atomically) with only its readable lines for which `keep(record)` holds, each
    line as it was; return the numbers of the unreadable lines dropped (`parse_jsonl`). A log that would not
    change is left untouched."""
    entries, dropped = parse_jsonl(path)
    kept = [line for line, record in entries if keep is None or keep(record)]
    if dropped or len(kept) < len(entries):
        write_file(path, "".join(line + "\n" for line in kept))
    return dropped


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:  # already gone
        pass


__all__ = [
    "aside",
    "current_umask",
    "fsync_path",
    "fsync_tree",
    "parse_jsonl",
    "read_jsonl",
    "recover_dir",
    "recover_leftovers",
    "umask_mode",
    "write_dir",
    "write_file",
]
