"""Saves killed at every filesystem step leave the previous complete copy or the new one, never a torn one;
a torn last log line never stops a resume. The `kill` fixture (conftest.py) simulates the SIGKILL."""

import json
import os

import pytest
import torch

from training.checkpoint import latest_checkpoint, load_training_state, save_checkpoint


def _hidden(folder):
    return sorted(path.name for path in folder.rglob(".*"))


def _each_kill_point(kill, save, restart, limit=200) -> int:
    """For at = 1, 2, ...: `save(at, killer)` killed at filesystem step `at`, then `restart(at)` (the real calls
    back); until a save completes unkilled. Returns the number of steps the save takes."""
    for at in range(1, limit):
        killer = kill(at)
        try:
            save(at, killer)
        except KeyboardInterrupt:
            assert killer.fired
        killer.disarm()
        if not killer.fired:
            return at - 1
        restart(at)
    raise AssertionError("the save never completed")


# ------------------------------------------------------------------------------------------------- mllm.io
def test_write_file_killed_anywhere_leaves_the_old_or_the_new_content(tmp_path, kill):
    from mllm.io import recover_leftovers, write_file

    def save(at, killer):
        folder = tmp_path / f"k{at}"
        folder.mkdir()
        (folder / "log.json").write_text("old")
        write_file(folder / "log.json", "new")

    def restart(at):
        folder = tmp_path / f"k{at}"
        recover_leftovers(folder)
        assert (folder / "log.json").read_text() == "old" and _hidden(folder) == []

    steps = _each_kill_point(kill, save, restart)
    assert steps >= 1 and (tmp_path / f"k{steps + 1}" / "log.json").read_text() == "new"


def _write_version(version: str):
    def write(folder):
        (folder / "sub").mkdir()
        (folder / "a.txt").write_text(version)
        (folder / "sub" / "b.txt").write_text(version * 1000)
    return write


def _version(folder) -> str:
    """The one version every file of a folder holds (fails on a mix or a torn file)."""
    a, b = (folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()
    assert b == a * 1000
    return a


def test_write_dir_killed_anywhere_leaves_the_previous_or_the_new_folder(tmp_path, kill):
    from mllm.io import recover_dir, write_dir

    outcomes = []

    def save(at, killer):
        target = tmp_path / f"k{at}" / "model"
        killer.armed = False
        write_dir(target, _write_version("A"))
        killer.armed = True
        write_dir(target, _write_version("B"))

    def restart(at):
        target = tmp_path / f"k{at}" / "model"
        recover_dir(target)  # what a restart does first
        outcomes.append(_version(target))
        assert _hidden(target.parent) == []

    steps = _each_kill_point(kill, save, restart)
    assert steps >= 3 and outcomes[0] == "A" and set(outcomes) == {"A", "B"}
    assert _version(tmp_path / f"k{steps + 1}" / "model") == "B"


def test_write_dir_error_in_write_keeps_the_target_and_leaves_no_temp(tmp_path):
    from mllm.io import write_dir

    target = tmp_path / "model"
    write_dir(target, _write_version("A"))

    def broken(folder):
        (folder / "a.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir(target, broken)
    assert _version(target) == "A" and _hidden(tmp_path) == []


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    """The process runs under this umask inside the test (the user's own, or a shared group's)."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root) -> dict[str, set[int]]:
    """{"dirs": permission bits of the folders under root (root included), "files": ... of the files}."""
    found = {"dirs": {root.stat().st_mode & 0o7777}, "files": set()}
    for path in root.rglob("*"):
        found["dirs" if path.is_dir() else "files"].add(path.stat().st_mode & 0o7777)
    return found


def test_saved_folders_and_files_get_the_umask_modes_whatever_the_writer_chose(tmp_path, umask):
    """safetensors (>= 0.8) writes its files 0600 and tempfile makes 0700 folders whatever the umask; a saved
    folder is 755 / 644 under umask 022 and 775 / 664 under 002, an executable file keeps its x bits."""
    import tempfile

    from safetensors.torch import save_file

    from mllm.io import current_umask, write_dir, write_file

    assert current_umask() == umask

    def write(folder):
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        private = tempfile.mkdtemp(dir=folder)
        (folder / "private").mkdir()
        os.rename(private, folder / "private" / "made-by-mkdtemp")
        (folder / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(folder / "run.sh", 0o700)
        (folder / "config.json").write_text("{}")

    assert (os.stat(tmp_path).st_mode & 0o7777) in (0o700, 0o777 & ~umask)  # pytest's own, not ours
    target = write_dir(tmp_path / "out" / "model", write)
    dirs, files = 0o777 & ~umask, 0o666 & ~umask
    assert _modes(target) == {"dirs": {dirs}, "files": {files, dirs}}
    assert target.joinpath("run.sh").stat().st_mode & 0o777 == dirs  # executable stays executable
    assert target.joinpath("model.safetensors").stat().st_mode & 0o777 == files
    assert write_file(tmp_path / "out" / "log.json", "{}").stat().st_mode & 0o777 == files
    assert tmp_path.joinpath("out").stat().st_mode & 0o777 == dirs


def test_a_saved_model_folder_gets_the_umask_modes(tmp_path, umask):
    from mllm.init import init_model

    folder = init_model("tiny", "tiny", tmp_path / "model", seed=0)
    assert _modes(folder) == {"dirs": {0o777 & ~umask}, "files": {0o666 & ~umask}}


def test_a_setgid_folder_stays_setgid(tmp_path):
    from mllm.io import fsync_tree

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2700)
    if not shared.stat().st_mode & 0o2000:
        pytest.skip("this file system does not keep the setgid bit")
    previous = os.umask(0o002)
    try:
        fsync_tree(shared)
    finally:
        os.umask(previous)
    assert shared.stat().st_mode & 0o7777 == 0o2775


def test_parse_jsonl_drops_a_torn_line(tmp_path):
    from mllm.io import parse_jsonl, read_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    entries, dropped = parse_jsonl(log)
    assert [line for line, _ in entries] == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}']
    assert dropped == [4]
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_replace_killed_anywhere_keeps_a_complete_checkpoint(tmp_path, kill):
    """training.checkpoint (the tokenizer's checkpoints): replacing step-5 and killed at any step, the restart
    finds a complete step-5, the old one or the new one, with no leftovers."""
    from mllm.io import recover_leftovers

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def save(parent, version):
        def save_model(folder):
            folder.mkdir()
            (folder / "weights.txt").write_text(version)

        save_checkpoint(parent / "step-5", save_model, {"optimizer": optimizer}, {"step": 5, "version": version})

    outcomes = []

    def kill_a_replacement(at, killer):
        parent = tmp_path / f"k{at}"
        killer.armed = False
        save(parent, "old")
        killer.armed = True
        save(parent, "new")

    def restart(at):
        parent = tmp_path / f"k{at}"
        recover_leftovers(parent)  # what train_tokenizer does before it resumes
        last = latest_checkpoint(parent)
        assert last == parent / "step-5", f"killed at step {at}: no complete checkpoint left"
        state = load_training_state(last, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
        assert (last / "model" / "weights.txt").read_text() == state["version"]
        outcomes.append(state["version"])
        assert _hidden(parent) == []

    assert _each_kill_point(kill, kill_a_replacement, restart) >= 2
    assert outcomes[0] == "old" and set(outcomes) == {"old", "new"}


def test_tokenizer_final_save_killed_anywhere_never_looks_trained_unless_it_is(tmp_path, kill):
    """train_tokenizer's final save writes into OUT (beside checkpoints/ and the log): OUT looks trained
    (`trained_already`: model.safetensors) only once the whole tokenizer is there."""
    from tokenizer_vision import DualCodebookTokenizer
    from training.data import trained_already
    from training.train_tokenizer import recover_final, save_final

    torch.manual_seed(0)
    tokenizer = DualCodebookTokenizer.from_name("tiny")
    expected = tokenizer.state_dict()

    def save(at, killer):
        out = tmp_path / f"k{at}"
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        save_final(tokenizer, out)

    def restart(at):
        out = tmp_path / f"k{at}"
        recover_final(out)  # what train_tokenizer does first
        if trained_already(out, "tokenizer"):  # the rerun would stop here: it must be the whole tokenizer
            loaded = DualCodebookTokenizer.from_pretrained(out).state_dict()
            assert loaded.keys() == expected.keys()
            assert all(torch.equal(loaded[k], v) for k, v in expected.items())
        else:
            save_final(tokenizer, out)  # the rerun trains (resumes) and saves again
            assert trained_already(out, "tokenizer")
        assert _hidden(out) == [] and (out / "metrics.jsonl").is_file()

    assert _each_kill_point(kill, save, restart) >= 3


# -------------------------------------------------------------------------------- LLM runs (components)
def test_a_checkpoint_with_a_torn_trainer_state_is_passed_over(tmp_path):
    from training.components import complete_checkpoints

    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # killed mid-write
    assert complete_checkpoints(tmp_path) == [(3, tmp_path / "checkpoint-3")]


def test_truncate_metrics_drops_a_torn_last_line(tmp_path, capsys):
    from training.components import truncate_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    truncate_metrics(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert "unreadable line" in capsys.readouterr().out
    assert _hidden(tmp_path) == []
