import os
import subprocess
import sys
import time

import pytest

from mllm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.time(); from mllm.cli import main; main(['--help']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); "
        "print(time.time()-t)"
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert time.time() - start < 2.0, proc.stdout


def test_every_command_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from mllm.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code == 0, name\n"
        "    heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "    assert not heavy, (name, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_option_error_of_a_subcommand_starts_with_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shapes", "--out", "o", "--n", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("mllm data: error: argument --n: must be a positive integer, got 0 "
                                       "(see `mllm data shapes --help`)\n")


def test_every_command_module_is_in_the_one_commands_folder():
    import importlib

    for name, (module_name, _) in COMMANDS.items():
        assert module_name.startswith("mllm.commands."), name
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name


def _mllm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllm.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)


def test_user_mistakes_are_one_line_with_the_closest_name_and_exit_2(tmp_path):
    model = str(tmp_path / "model")
    cases = [
        (["train", "--recipe", "shapes-sftt", "--model", model, "--data", "d", "--out", "o"],
         "mllm train: error: unknown recipe 'shapes-sftt'; did you mean shapes-sft? (choose from: align, "),
        (["train", "--recipe", "sft", "--model", model, "--data", "d", "--out", "o", "--set", "learnig_rate=1e-4"],
         "mllm train: error: unknown config key 'learnig_rate' (did you mean learning_rate?)"),
        (["train", "--recipe", "sft", "--model", model, "--data", "d", "--out", "o", "--set", "learning_rate=fast"],
         "mllm train: error: learning_rate: expected a number, got 'fast'"),
        (["eval", "--suite", "vqa2", "--model", model, "--out", str(tmp_path / "e")],
         "mllm eval: error: unknown suite 'vqa2'; did you mean vqav2? (choose from: "),
        (["demo", "--size", "tny", "--out", str(tmp_path / "demo")],
         "mllm demo: error: argument --size: invalid choice 'tny'; did you mean tiny?"),
        (["evl", "--help"], "mllm: error: unknown command 'evl' (did you mean eval?)"),
        (["ask", "--model", model, "x.png", "q"], f"mllm ask: error: model folder {model} does not exist"),
    ]
    for argv, start in cases:
        proc = _mllm(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith(start), (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and not (tmp_path / "demo").exists()


def test_internal_errors_keep_their_traceback(monkeypatch):
    from mllm.commands import data

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(data, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["data", "shapes", "--out", "o", "--n", "1"])
