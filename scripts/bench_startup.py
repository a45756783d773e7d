"""Wall time of the one-shot commands, as a user at a terminal sees it.

    python scripts/bench_startup.py --model runs/demo/model --image scene.png [--repeats 5]

Measures `mllm --help`; `mllm ask` in its own process (`--no-worker`: imports + load + answer); and
`mllm ask` through the warm worker: the first call (which starts it) and the calls after it. Each figure
is the median of --repeats runs of the installed `mllm` next to this Python. The worker runs in a
private temporary folder and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--image", required=True, help="an image the question is about")
    parser.add_argument("--question", default="How many objects are there?")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    mllm = str(Path(sys.executable).with_name("mllm"))
    ask = [mllm, "ask", "--model", args.model, args.image, args.question]
    env = dict(os.environ)
    results: dict[str, list[float]] = {"mllm --help": [], "ask --no-worker": [], "ask, first (starts worker)": [],
                                       "ask, warm worker": []}
    for _ in range(args.repeats):
        results["mllm --help"].append(timed([mllm, "--help"], env))
        results["ask --no-worker"].append(timed([*ask, "--no-worker"], env))
        with tempfile.TemporaryDirectory() as folder:
            Path(folder).chmod(0o700)
            worker_env = {**env, "MLLM_WORKER": "1", "MLLM_WORKER_DIR": folder}
            results["ask, first (starts worker)"].append(timed(ask, worker_env))
            results["ask, warm worker"] += [timed(ask, worker_env) for _ in range(3)]
            for pid_file in Path(folder).glob("*.pid"):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
    for name, values in results.items():
        print(f"{name:<30} median {statistics.median(values):6.2f} s   runs: "
              + " ".join(f"{value:.2f}" for value in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
