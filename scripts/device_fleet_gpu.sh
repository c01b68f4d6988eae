#!/usr/bin/env bash
# Issue 8 in one device call: the fleet benchmark on every GPU of the machine (one replica per GPU),
# our router against Ray Serve's default, then one replica alone for the scaling target.
#
#   here, once:  ../shared/tools/device-pydeps.sh      (Ray Serve + boto3 for Python 3.12 -> .devdeps/)
#   device call: run(kind="nvidia-h200-x4", carry=[".devdeps"], timeout_s=600,
#                    command="bash scripts/device_fleet_gpu.sh")
#
# Writes $OUT/fleet_gpu.json, fleet_gpu.png and fleet_gpu.log (copy the first two into
# benchmarks/results/). Each phase's figures are printed as one JSON line as soon as it ends, so a
# run stopped by the time limit still leaves them in the log.
set -euo pipefail
: "${OUT:?OUT is not set: this runs on the device machine}"
mkdir -p /tmp/site
tar xJf .devdeps/pydeps.tar.xz -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
# NVLink multicast stays off (the device tool's KINDS.md); Ray's workers inherit this environment.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
gpus=$(nvidia-smi -L | wc -l)
# The call's limit is 600 s: unpacking takes ~20 s, so the benchmark gets 540 s and 15 s to be killed.
timeout -k 15 540 python3 -m benchmarks.fleet --gpus "$gpus" --out "$OUT" 2>&1 | tee "$OUT/fleet_gpu.log"
