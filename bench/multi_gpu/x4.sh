#!/usr/bin/env bash
# Issue 11 on nvidia-h200-x4 (four H200 of one host): swapping throughput (run 1), disaggregation against
# colocation on pipelines (run 2), failover with stages on different GPUs (run 3, the failover helper's bench).
#
#   bash bench/multi_gpu/x4.sh [OUT] [PART...]     OUT: results folder (default bench/results);
#                                                  PART: swap, disagg, failover (default: all three)
#
# Through the device tool, from the repository root, the working tree as it is (PYTHONPATH=$PWD, nothing
# installed; nccl4py, when a part needs it, travels as a wheel in .whl/: once, here,
# `echo /.whl/ >> .git/info/exclude` and `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl nccl4py==0.6.0`;
# the script installs it with pip --no-index into /tmp/site). NCCL_NVLS_ENABLE is left as the machine sets it.
# Each part is bounded by `timeout` below 600 s, the device tool's limit per command, so call it part by part
# (about 20 minutes in all at these defaults, under the 30-minute hold of one machine):
#
#   run(kind="nvidia-h200-x4", carry=[".whl"], timeout_s=600,
#       command="KVSTREAM_GIT_SHA=<git rev-parse --short HEAD> bash bench/multi_gpu/x4.sh $OUT swap")
#   ... the same with "$OUT disagg", then "$OUT failover"
#
# Each call writes summary.json, <topic>.csv/.png, manifest-x4.json (device, date, sha, exit codes) and
# x4-runs.tar.gz (logs, per-run folders) under OUT; commit them under bench/results/ with the date and device.
set -u
cd "$(dirname "$0")/../.."
. bench/multi_gpu/common.sh
mg_setup x4 "$@"

# Run 1: D = 4 stages, one GPU each, Llama-3-8B shape (32 layers), b = 4 rows, M = 4; swap runs 8-row microbatches
# (D/2 larger) under a per-stage budget that holds two of them = the baseline's four (a cap: a smaller GPU).
mg_wanted swap && mg_topic swap_throughput 570 "$MG_PY" -m kvstream.bench.swap_throughput --out "$OUT" --stages 4 \
    --layers 32 --batch 4 --prompt-tokens 512 --new-tokens 64 --reps 5
# Run 2: prompt pipeline (2 GPUs) + token pipeline (2 GPUs) against one 4-stage pipeline of the same GPUs, 4 rates.
mg_wanted disagg && mg_topic disagg 540 "$MG_PY" -m kvstream.bench.disagg --out "$OUT" --engine pipeline --gpus 4 \
    --layers 32 --rates 2,4,8,16 --requests 32 --prompt-tokens 1024 --output-tokens fixed:64 --microbatch 4
# Run 3: the failover helper's bench (issue 10), when it is in this tree.
# (guarded: runs `python3 -m kvstream.bench.failover` only when kvstream/bench/failover.py exists)
mg_wanted failover && mg_failover 540
mg_finish
