#!/usr/bin/env bash
# GPU check for a lent CUDA machine (an H200 here): environment, the CUDA-relevant tests, and the
# `gpu_check` benchmark suite (configs/bench/gpu_check.toml), everything written under OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on the device: bash benchmarks/gpu_check.sh "$OUT"
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh /tmp/gc   # dry run on CPU: tiny models, same code paths
#
# Runs from the repository root. Nothing is downloaded: dpengine is installed from this tree with pip
# --no-index --no-deps (only if it is not importable), Opacus from wheels in .whl/ if the machine lacks it
# (without it the Opacus rows say "skipped: opacus is not installed"); torch is never touched.
#
# Time guards: the whole script keeps to GPU_CHECK_BUDGET_S (default 420 s; at worst about 435 s, under
# 7.5 minutes). Every part runs under `timeout` (SIGTERM, then SIGKILL 15 s later): environment 45 s, install
# 90 s, fused-kernel tests 100 s, other tests 90 s, the CUDA sync test 60 s, dpengine train 40 s, the benchmark what is left minus 45 s kept for its
# report (bf16 GPT-2 small rows first: non-private, bk, fused, fused+per_layer, Opacus), and each benchmark
# configuration 100 s (worker_timeout_s in the suite). The benchmark appends every result to
# OUTDIR/results.jsonl the moment it is measured; on SIGTERM it writes its report from what finished, and
# if it had to be killed the report is rebuilt from that JSONL. At most 7 files land in OUTDIR (the device
# returns at most 8).
set -u -o pipefail

OUTDIR=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-420}
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && PY=.venv/bin/python
export PY PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
LOG="$OUTDIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
SECONDS=0
declare -A RC

say() { printf '\n=== [%3ds] %s\n' "$SECONDS" "$*"; }
left() { echo $((BUDGET - SECONDS)); }
# guard SECONDS_CAP NAME CMD...: run CMD under `timeout`, capped by what is left of the budget minus RESERVE
guard() {
    local cap=$1 name=$2 t
    shift 2
    t=$(($(left) - ${RESERVE:-0}))
    ((t > cap)) && t=$cap
    if ((t < 5)); then
        say "$name: skipped, out of time"
        RC[$name]=skipped
        return 0
    fi
    say "$name (time limit ${t}s)"
    timeout -k 15 "$t" "$@"
    RC[$name]=$?
    ((RC[$name] == 124 || RC[$name] == 137)) && say "$name: TIMED OUT after ${t}s (partial results kept)"
    return 0
}

say "gpu_check: OUTDIR=$OUTDIR budget=${BUDGET}s dry=$DRY python=$PY"

# ---- 1. environment ---------------------------------------------------------------------------------
env_report() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uname -a
    command -v nvidia-smi >/dev/null &&
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 supported {torch.cuda.is_bf16_supported()}")
for pkg in ("triton", "opacus", "matplotlib", "pytest", "hypothesis", "dpengine"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
EOF
}
export -f env_report
guard 45 env bash -c env_report

# ---- 2. install what is missing (offline; never torch) ------------------------------------------------
install() {
    if ! "$PY" -c "import dpengine.bench, dpengine.configs.bench" 2>/dev/null; then
        echo "installing dpengine from this tree (editable, --no-deps, offline)"
        PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
            echo "pip install -e . failed"
    fi
    if ! "$PY" -c "import dpengine.bench, dpengine.configs.bench" 2>/dev/null; then
        # last resort on a bare machine: the package layout of pyproject.toml through links in this copy
        echo "linking accounting/, kernels/ and configs/ into dpengine/ (this copy of the tree only)"
        for d in accounting kernels configs; do [ -e "dpengine/$d" ] || ln -s "../$d" "dpengine/$d"; done
    fi
    if ! "$PY" -c "import opacus" 2>/dev/null; then
        if compgen -G ".whl/*.whl" >/dev/null; then
            echo "installing carried wheels: $(ls .whl)"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl || echo "wheel install failed"
        else
            echo "opacus is not installed and no .whl/ was carried: the Opacus rows will be skipped"
        fi
    fi
    for mod in pytest hypothesis mpmath matplotlib; do
        "$PY" -c "import $mod" 2>/dev/null || echo "missing: $mod (tests or the plot may be skipped)"
    done
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export -f install
guard 90 install bash -c install
if ! "$PY" -c "import dpengine.bench, dpengine.configs.bench" 2>/dev/null; then
    say "dpengine is not importable: nothing else can run"
    exit 3
fi

# ---- 3. CUDA-relevant tests ---------------------------------------------------------------------------
# The fused kernels against their references and the fused backend against the oracle, compiled on the GPU
# (one autotune config: few compilations), first; then the mixed-precision and engine tests.
guard 100 kernel_tests env DPENGINE_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -x -p no:cacheprovider -rs \
    tests/test_kernels.py tests/test_fused_backend.py
guard 90 tests "$PY" -m pytest -q -x -p no:cacheprovider tests/test_mixed_precision.py tests/test_loss_scale.py tests/test_engine.py
# no host-device synchronization in a steady-state step: CUDA's sync detector, every mode, fp32 and bf16
guard 60 sync_tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_sync_free.py -k cuda
# dpengine train on the GPU in bf16 (the packaged default job, digits MLP; one JSON line into the log)
[ "$DRY" = 1 ] && TRAIN_DEVICE=cpu || TRAIN_DEVICE=cuda
guard 40 train "$PY" -m dpengine.cli train --device "$TRAIN_DEVICE" --precision bf16 --no-progress --json

# ---- 4. benchmark suite ---------------------------------------------------------------------------------
SUITE=gpu_check
if [ "$DRY" = 1 ]; then  # the same suite's shape with tiny models on the CPU
    SUITE=$(mktemp --suffix=.toml)
    cat >"$SUITE" <<'EOF'
name = "gpu_check_dry"
description = "Dry run of the gpu_check suite on the CPU: tiny models, the same modes and precisions."
rounds = 1
warmup = 1
steps = 10
threads = 1
device = "cpu"
accounting = false
worker_timeout_s = 100
precisions = ["bf16", "tf32"]
modes = ["nonprivate", "bk", "fused", "fused+per_layer", "opacus-ghost", "opacus-hooks"]

[[model]]
name = "gpt2-small"
batch = [2]
params = { vocab = 64, seq_len = 16, d = 16, layers = 2, heads = 2 }
precisions = ["bf16"]
modes = ["nonprivate", "bk", "fused", "opacus-ghost"]

[[model]]
name = "gpt"
batch = [2]
params = { vocab = 32, seq_len = 8, d = 16, layers = 1, heads = 2 }

[[model]]
name = "mlp"
batch = [8]
params = { sizes = [16, 8, 4] }

[[model]]
name = "cnn"
batch = [2]
params = { channels = [4, 4, 4], groups = 2 }
EOF
fi
RESERVE=45 guard 600 bench "$PY" -m dpengine.cli bench --suite "$SUITE" --output-dir "$OUTDIR" --no-progress
if [ "${RC[bench]}" != 0 ] && [ -s "$OUTDIR/results.jsonl" ] &&
    { [ ! -s "$OUTDIR/RESULTS.md" ] || [ "$OUTDIR/RESULTS.md" -ot "$OUTDIR/results.jsonl" ]; }; then
    guard 25 report "$PY" -m dpengine.cli bench --rebuild-report "$OUTDIR/results.jsonl" --output-dir "$OUTDIR"
fi
[ "$DRY" = 1 ] && rm -f "$SUITE"

# ---- summary ------------------------------------------------------------------------------------------
say "summary"
[ -s "$OUTDIR/results_table.md" ] && cat "$OUTDIR/results_table.md"
for part in env install kernel_tests tests sync_tests train bench report; do
    [ -n "${RC[$part]:-}" ] && printf '%s: %s\n' "$part" "${RC[$part]}"
done
ls -l "$OUTDIR"
echo "gpu_check done in ${SECONDS}s"
