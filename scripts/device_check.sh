#!/usr/bin/env bash
# One prepared check of the project on a CUDA machine, in at most 8 minutes (BUDGET_S, default 470 s).
#
#   OUT=device-out bash scripts/device_check.sh        # from anywhere; it runs in the repository root
#
# Parts, in this order (each under `timeout`, capped by what is left of the budget; a part that fails is
# recorded and the next one runs):
#   env         nvidia-smi, python / torch / CUDA versions (read only: nothing resets or reconfigures the GPU)
#   install     only when the project's imports fail: wheels in $WHEELS (default .whl) if that folder exists,
#               then `pip install -e '.[dev]'` (torch is preinstalled there and kept), then
#               `pip install --no-deps --no-build-isolation -e .`; the repository is on PYTHONPATH anyway
#   pytest      the test files that can use a GPU: those naming torch.cuda.is_available, a cuda/gpu marker
#               or flash_attention_2 (grep), without the slow ones; first, so that the budget never cuts it
#   bench-*     scripts/bench_generate.py --device cuda --dtype bf16 on the demo-sized model and with
#               --llama-100m, attention sdpa (the project's default, mllm/model.py)
#   train-*     one optimizer step of each shipped shapes recipe (training/configs/*shapes*.yaml) on a small
#               `mllm data shapes` set: teacher-shapes (mllm train-teacher), tokenizer-shapes
#               (mllm train-tokenizer), then mllm init + mllm pretokenize, shapes-pretrain and shapes-sft
#               (mllm train), shapes-ett (mllm train on a codebook-mode init and raw shards); then
#               train-shapes-pretrain-fsdp: two steps of shapes-pretrain under `accelerate launch` with the
#               shipped GPU config training/configs/accelerate/fsdp.yaml (one process per GPU, at most 2), a
#               sharded checkpoint after step 1
#   bench-*-flash  the two benchmarks again with --attn flash_attention_2, when `import flash_attn` works
#               (optional: skipped when flash-attn is absent, which does not fail the check)
#   pytest-vllm the vLLM engine's tests (tests/serve/test_vllm_engine.py: greedy chat equal to the built-in
#               engine, guided drawing pairs, a lost partner failing cleanly) on the GPU, when `import vllm`
#               works (optional, as flash-attn: the GPU wheel is `vllm`, see docs/serving.md)
#
# Everything is written under OUT (default ./device-out): summary.txt (every part's status and time, the
# benchmarks' key figures), bench.jsonl (the benchmarks' JSON lines), bench.md (their tables),
# device-check.log (this script's transcript) and logs.tar.gz (each part's full log, packed at the end so
# few files come back; KEEP_LOGS=1 also keeps OUT/logs/). Models and data go to a temporary WORK folder.
# Exit status: 0 when every part that ran passed (an absent optional part is no failure), 1 otherwise.
#
# Settings (environment): PYTHON (default python3), OUT, WORK, BUDGET_S (470), BENCH_ARGS (default
# "--repeats 2"), DEVICE (cuda; DEVICE=cpu is a local smoke run of the same commands with --quick benchmarks).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT="${OUT:-./device-out}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
BUDGET_S="${BUDGET_S:-470}"
WHEELS="${WHEELS:-.whl}"
if [[ "$DEVICE" == cpu ]]; then
    BENCH_ARGS="${BENCH_ARGS:---quick --bandwidth-mib 64}"
else
    BENCH_ARGS="${BENCH_ARGS:---repeats 2}"
fi
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")}"
mkdir -p "$WORK"
IMPORTS="import mllm, tokenizer_vision, training, transformers, peft, accelerate, sentencepiece, webdataset, yaml, pytest"
export PY WHEELS IMPORTS  # read by the functions that run in a bash of their own (export -f)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false MLLM_WORKER=0
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$OUT/bench.jsonl"
: >"$OUT/bench.md"
FAILED=0
exec > >(tee "$OUT/device-check.log") 2>&1

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# part NAME SECONDS COMMAND...: run COMMAND under timeout (SECONDS, or what is left of the budget), its output
# in logs/NAME.log, and one status line in summary.txt. Returns the command's status; never exits the script.
part() {
    local name="$1" limit="$2"
    shift 2
    local remaining
    remaining=$(left)
    if ((remaining < 15)); then
        note "$name: SKIPPED (budget spent)"
        FAILED=1
        return 1
    fi
    ((limit > remaining - 5)) && limit=$((remaining - 5))
    echo "== $name (timeout ${limit}s): $*"
    # A shell function (exported below) runs in a bash of its own: timeout runs programs only.
    declare -F "$1" >/dev/null && set -- bash -c '"$@"' "$name" "$@"
    local begin rc=0
    begin=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    local took=$(($(date +%s) - begin))
    if ((rc == 0)); then
        note "$name: ok (${took} s)"
    elif ((rc == 124 || rc == 137)); then
        note "$name: TIMEOUT after ${took} s (limit ${limit} s)"
        FAILED=1
    else
        note "$name: FAILED rc=$rc (${took} s): $(tail -n 1 "$LOGS/$name.log")"
        FAILED=1
    fi
    return "$rc"
}

# needs NAME PATH: a part that needs an earlier part's output is skipped (and counted as failed) without it.
needs() {
    [[ -e "$2" ]] && return 0
    note "$1: SKIPPED (needs $2, which an earlier part did not make)"
    FAILED=1
    return 1
}

finish() {
    local rc=$?
    note "total: $(($(date +%s) - START)) s of ${BUDGET_S} s; $([[ $FAILED == 0 && $rc == 0 ]] && echo PASSED || echo FAILED)"
    local metrics
    for metrics in "$WORK"/train-*/metrics.jsonl; do
        [[ -f "$metrics" ]] && cp "$metrics" "$LOGS/$(basename "$(dirname "$metrics")").metrics.jsonl"
    done
    tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null || true
    [[ "${KEEP_LOGS:-0}" == 1 ]] || rm -rf "$LOGS"
    [[ "${KEEP_WORK:-0}" == 1 ]] || rm -rf "$WORK"
}
trap finish EXIT

note "device check: $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, budget ${BUDGET_S} s, OUT $OUT"

# ---------------------------------------------------------------- env
env_info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported())
EOF
}
export -f env_info
part env 60 env_info || true
cat "$LOGS/env.log"
echo "  $(grep -m1 '^python ' "$LOGS/env.log" || echo 'python: unknown')" >>"$SUMMARY"
if [[ "$DEVICE" == cuda ]] && ! grep -q 'available True' "$LOGS/env.log"; then
    note "CUDA is not available to $PY: nothing else to check"
    exit 1
fi

# ---------------------------------------------------------------- install (only when needed)
install_project() {
    if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl || true
    fi
    PYTHONPATH="/tmp/site:$PYTHONPATH" "$PY" -c "$IMPORTS" 2>/dev/null && return 0
    "$PY" -m pip install --no-input --retries 0 --timeout 10 -e '.[dev]' ||
        "$PY" -m pip install --no-deps --no-build-isolation -e . || true
    PYTHONPATH="/tmp/site:$PYTHONPATH" "$PY" -c "$IMPORTS"
}
export -f install_project
if timeout 120 "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    note "install: not needed (the project and its dependencies import)"
else
    part install 150 install_project || true
    [[ -d /tmp/site ]] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
    for module in transformers peft accelerate sentencepiece webdataset yaml pytest; do
        timeout 60 "$PY" -c "import $module" >/dev/null 2>&1 || note "  missing module: $module"
    done
fi

# ---------------------------------------------------------------- the tests that can use a GPU
# First after the install: the correctness check is the part the budget must not cut (on 2026-12-04 the
# benchmarks and training steps used the whole budget and it was skipped).
GPU_TESTS=$(grep -rlE 'torch\.cuda\.is_available|mark\.(cuda|gpu)|flash_attention_2' tests --include='*.py' | sort |
    tr '\n' ' ')
note "GPU test files: $GPU_TESTS"
# shellcheck disable=SC2086
part pytest-gpu 150 "$PY" -m pytest -q -p no:cacheprovider -m 'not slow' $GPU_TESTS || true
note "  $(grep -E '(passed|failed|error)' "$LOGS/pytest-gpu.log" | tail -n 1 || true)"

# ---------------------------------------------------------------- benchmarks
BENCH_DEVICE=(--device "$DEVICE" --dtype bf16)
bench() {  # bench NAME ARGS...: one benchmark run; its JSON line -> bench.jsonl, its table -> bench.md
    local name="$1"
    shift
    # shellcheck disable=SC2086
    part "$name" "$BENCH_LIMIT" "$PY" scripts/bench_generate.py "${BENCH_DEVICE[@]}" $BENCH_ARGS "$@" || return 0
    grep '^{' "$LOGS/$name.log" | tail -n 1 >>"$OUT/bench.jsonl" || true
    { echo "## $name"; grep -E '^(model:|weights read|\||note:)' "$LOGS/$name.log"; echo; } >>"$OUT/bench.md"
}
BENCH_LIMIT=150
bench bench-demo-sdpa --attn sdpa
BENCH_LIMIT=180
bench bench-100m-sdpa --llama-100m --attn sdpa

# ---------------------------------------------------------------- one step of each shapes recipe
mllm() { "$PY" -m mllm.cli "$@"; }
export -f mllm
DATA="$WORK/data"
RECIPES=$(cd training/configs && ls ./*shapes*.yaml | sed 's|^\./||; s|\.yaml$||' | tr '\n' ' ')
note "shapes recipes: $RECIPES"
LLM_SMALL=(--set per_device_batch_size=4 num_samples=16 logging_steps=1 max_length=512)
part data 60 mllm data shapes --out "$DATA" --n 64 --tasks --no-progress || true
if needs train-teacher-shapes "$DATA"; then
    part train-teacher-shapes 90 mllm train-teacher --recipe teacher-shapes --data "$DATA" \
        --out "$WORK/teacher" --max-steps 1 --set batch_size=32 log_every=1 || true
fi
if needs train-tokenizer-shapes "$WORK/teacher/model.safetensors"; then
    part train-tokenizer-shapes 90 mllm train-tokenizer --recipe tokenizer-shapes --data "$DATA" \
        --teacher "$WORK/teacher" --out "$WORK/tokenizer" --max-steps 1 --set batch_size=8 log_every=1 || true
fi
if needs init "$WORK/tokenizer/config.json"; then
    part init 60 mllm init --llm shapes --vision-tokenizer "$WORK/tokenizer" --out "$WORK/init" || true
    part init-codebook 60 mllm init --llm shapes --vision-tokenizer "$WORK/tokenizer" --embedding codebook \
        --out "$WORK/init-codebook" || true
    part pretokenize 60 mllm pretokenize --data "$DATA" --vision-tokenizer "$WORK/tokenizer" \
        --out "$WORK/codes" --device "$DEVICE" --no-progress || true
fi
if needs train-shapes-pretrain "$WORK/init/mllm_config.json" && needs train-shapes-pretrain "$WORK/codes"; then
    part train-shapes-pretrain 90 mllm train --recipe shapes-pretrain --model "$WORK/init" --data "$WORK/codes" \
        --out "$WORK/train-shapes-pretrain" --max-steps 1 "${LLM_SMALL[@]}" || true
fi
if needs train-shapes-pretrain-tasks "$WORK/init/mllm_config.json" && needs train-shapes-pretrain-tasks "$WORK/codes"; then
    part train-shapes-pretrain-tasks 90 mllm train --recipe shapes-pretrain-tasks --model "$WORK/init" \
        --data "$WORK/codes" --out "$WORK/train-shapes-pretrain-tasks" --max-steps 1 "${LLM_SMALL[@]}" || true
fi
if needs train-shapes-sft "$WORK/train-shapes-pretrain/model" && needs train-shapes-sft "$WORK/codes"; then
    part train-shapes-sft 90 mllm train --recipe shapes-sft --model "$WORK/train-shapes-pretrain/model" \
        --data "$WORK/codes" --out "$WORK/train-shapes-sft" --max-steps 1 "${LLM_SMALL[@]}" || true
fi
if needs train-shapes-ett "$WORK/init-codebook/mllm_config.json"; then
    part train-shapes-ett 90 mllm train --recipe shapes-ett --model "$WORK/init-codebook" --data "$DATA" \
        --out "$WORK/train-shapes-ett" --max-steps 1 "${LLM_SMALL[@]}" || true
fi
if needs train-shapes-pretrain-fsdp "$WORK/init/mllm_config.json" && needs train-shapes-pretrain-fsdp "$WORK/codes"; then
    GPUS=$("$PY" -c "import torch; print(max(1, min(2, torch.cuda.device_count())))" 2>/dev/null || echo 1)
    part train-shapes-pretrain-fsdp 120 "$PY" -m accelerate.commands.launch \
        --config_file training/configs/accelerate/fsdp.yaml --num_processes "$GPUS" -m mllm.cli train \
        --recipe shapes-pretrain --model "$WORK/init" --data "$WORK/codes" --out "$WORK/train-shapes-pretrain-fsdp" \
        --max-steps 2 "${LLM_SMALL[@]}" save_steps=1 || true
fi
for recipe in $RECIPES; do
    case "$recipe" in
        teacher-shapes | tokenizer-shapes | shapes-pretrain | shapes-pretrain-tasks | shapes-sft | shapes-ett) ;;
        *) note "train-$recipe: NOT RUN (no command for this recipe in scripts/device_check.sh yet)" ;;
    esac
done

# ---------------------------------------------------------------- optional: flash-attn
if timeout 60 "$PY" -c 'import flash_attn' >/dev/null 2>&1; then
    BENCH_LIMIT=120
    bench bench-demo-flash --attn flash_attention_2
    bench bench-100m-flash --llama-100m --attn flash_attention_2
else
    note "bench-*-flash: skipped (optional: flash_attn does not import)"
fi

# ---------------------------------------------------------------- optional: vLLM
if timeout 120 "$PY" -c 'import vllm' >/dev/null 2>&1; then
    part pytest-vllm 180 "$PY" -m pytest -q -p no:cacheprovider tests/serve/test_vllm_engine.py || true
    note "  $(grep -E '(passed|failed|error)' "$LOGS/pytest-vllm.log" | tail -n 1 || true)"
else
    note "pytest-vllm: skipped (optional: vllm does not import)"
fi

# ---------------------------------------------------------------- key figures
timeout 60 "$PY" - "$OUT/bench.jsonl" <<'EOF' | tee -a "$SUMMARY" || true
import json, sys

for line in open(sys.argv[1]):
    try:
        run = json.loads(line)
    except ValueError:
        continue
    print(f"{run['model']} ({run['llm_parameters'] / 1e6:.1f}M, {run['dtype']}, {run['attn_implementation']}, "
          f"{run.get('device_name') or run['device']}, {run['tokens_per_image']} tokens/image, "
          f"copy {run['copy_bandwidth_gb_per_s']:.0f} GB/s):")
    for r in run["results"]:
        vs = lambda key: "-" if r[key] is None else f"{r[key]:.2f}x"
        print(f"  {r['method']:<10} batch {r['batch_size']:>2}: {r['forwards_per_image']:g} forwards/image, "
              f"{r['ms_per_image']:.1f} ms/image, {r['images_per_s']:.1f} images/s, "
              f"{r['ms_per_forward']:.3f} ms/forward ({100 * r['fraction_of_bandwidth_bound']:.1f}% of bw bound), "
              f"{vs('speedup_vs_sequential')} vs sequential, {vs('speedup_vs_generate')} vs generate")
    for note in run["notes"]:
        print(f"  note: {note}")
EOF

exit "$FAILED"
