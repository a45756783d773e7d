import subprocess
import sys
import time

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
