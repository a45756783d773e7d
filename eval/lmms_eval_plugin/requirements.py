"""`python -m eval.lmms_eval_plugin.requirements`: print lmms-eval's own requirements (of the installed
distribution, extras left out) without torch, torchvision, torchaudio and timm, one per line.

`make test-lmms-eval` installs lmms-eval with `--no-deps`, then these with torch pinned: lmms-eval requires
torchvision (and timm, which requires it too), and the torchvision wheel that pip picks is a CUDA build, which
breaks transformers' imports on our CPU torch. Neither is needed by the model `mllm` or the shapes tasks.
"""

from __future__ import annotations

import re
from importlib.metadata import requires

LEFT_OUT = frozenset({"torch", "torchvision", "torchaudio", "timm"})


def requirements(distribution: str = "lmms_eval") -> list[str]:
    kept = []
    for requirement in requires(distribution) or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s<>=!~\[;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name not in LEFT_OUT and requirement not in kept:
            kept.append(requirement)
    return kept


if __name__ == "__main__":
    print("\n".join(requirements()))
