import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_train_runs_a_tiny_model_and_ends_with_mfu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as `python scripts/bench_train.py` has it: scripts/perf.py
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mfu = module.main(["--size", "tiny", "--samples", "16", "--steps", "2", "--repeats", "1", "--batch-size", "4",
                       "--configs", "packed-pre,unpacked-fly"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"MFU \d+\.\d%", lines[-1]), lines[-1]
    assert float(lines[-1][4:-1]) == round(mfu, 1)
    assert any(line.startswith("| packed-pre |") for line in lines)
    assert any(line.startswith("| unpacked-fly |") for line in lines)
