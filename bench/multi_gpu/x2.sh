#!/usr/bin/env bash
# Issue 11 on nvidia-h200-x2 (two H200 of one host, NVLink): NCCL handoff at every chunk size (run 4),
# disaggregation against colocation with one prompt and one token worker (run 2 at N = 2), failover with the
# replica on the neighbour GPU (run 3, the failover helper's bench).
#
#   bash bench/multi_gpu/x2.sh [OUT] [PART...]     OUT: results folder (default bench/results);
#                                                  PART: nccl, disagg, failover (default: all three)
#
# Through the device tool, from the repository root, the working tree as it is (PYTHONPATH=$PWD, nothing
# installed). nccl4py is not on the machine: it travels as a wheel in .whl/ (once, here:
# `echo /.whl/ >> .git/info/exclude` and `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl nccl4py==0.6.0`);
# the script installs it with pip --no-index into /tmp/site and puts that first on PYTHONPATH.
# NCCL_NVLS_ENABLE is left as the machine sets it (0). Each part is bounded by `timeout` below 600 s, the device
# tool's limit per command, so call it part by part (about 15 minutes in all at these defaults):
#
#   run(kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600,
#       command="KVSTREAM_GIT_SHA=<git rev-parse --short HEAD> bash bench/multi_gpu/x2.sh $OUT nccl")
#   ... the same with "$OUT disagg", then "$OUT failover"
#
# Each call writes summary.json, <topic>.csv/.png, manifest-x2.json (device, date, sha, exit codes) and
# x2-runs.tar.gz (logs, per-run folders) under OUT; commit them under bench/results/ with the date and device.
set -u
cd "$(dirname "$0")/../.."
. bench/multi_gpu/common.sh
mg_setup x2 "$@"

# Run 4: chunks of 4, 8, 16 and 32 MiB, 32 chunks each (128 MiB ... 1 GiB in 32 chunks); the worst size is the key.
if mg_wanted nccl; then
    "$MG_PY" -c "import nccl.core" 2>/dev/null || echo "== nccl: nccl4py is not importable (carry .whl); the topic will fail"
    mg_topic nccl_handoff 420 "$MG_PY" -m kvstream.bench.nccl_handoff --out "$OUT" --chunk-mib 4,8,16,32 --layers 32 --reps 10
fi
# Run 2 at N = 2: one prompt + one token worker over NCCL against two colocated workers, 4 rates.
mg_wanted disagg && mg_topic disagg 540 "$MG_PY" -m kvstream.bench.disagg --out "$OUT" --engine workers --gpus 2 \
    --layers 8 --rates 2,4,8,16 --requests 32 --prompt-tokens 1024 --output-tokens fixed:64 --microbatch 4
# Run 3: the failover helper's bench (issue 10), when it is in this tree.
# (guarded: runs `python3 -m kvstream.bench.failover` only when kvstream/bench/failover.py exists)
mg_wanted failover && mg_failover 540
mg_finish
