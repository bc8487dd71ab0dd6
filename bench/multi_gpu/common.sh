# Shared part of bench/multi_gpu/x2.sh and x4.sh (sourced, not run): environment, bounded topics, manifest.
#
#   mg_setup KIND OUT     MG_PY (the interpreter: $PYTHON, default python3), nccl4py from .whl/ if there (pip --no-index into /tmp/site), PYTHONPATH=/tmp/site:$PWD,
#                         MG_SHA (KVSTREAM_GIT_SHA if set, else git's, else "unknown"), OUT and its log folder
#   mg_wanted PART        whether PART was asked for on the command line (no parts named: every part)
#   mg_topic NAME SECS CMD...   run CMD under `timeout SECS` (its whole process group), log to OUT/logs-KIND/NAME.log,
#                         record its exit code; a failing topic does not stop the others. MG_QUICK=1 appends --quick
#                         (the topics' CPU smoke runs: how the scripts are tested without GPUs)
#   mg_failover SECS      the failover helper's bench (kvstream/bench/failover.py) when it is in the tree
#   mg_finish             write OUT/manifest-KIND.json (device, date, sha, exit codes), pack logs and per-run folders
#                         into OUT/KIND-runs.tar.gz (the device tool returns at most 8 files from $OUT); exit 1 if a
#                         topic failed
#
# NCCL_NVLS_ENABLE is never touched: the machines set it to 0 (NVLink multicast off) and it stays so.

mg_setup() {
    MG_KIND=$1
    MG_PY=${PYTHON:-python3}
    OUT=${2:-bench/results}
    shift 2 2>/dev/null || shift $#
    MG_PARTS=" $* "
    mkdir -p "$OUT/logs-$MG_KIND"
    OUT=$(cd "$OUT" && pwd)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$MG_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "mg_setup: installing .whl/*.whl failed" >&2; exit 2; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    # the topics read KVSTREAM_GIT_SHA when set (the device's copy has no .git), else ask git themselves
    MG_SHA=${KVSTREAM_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
    export PYTHONUNBUFFERED=1
    MG_STATUS=()
    MG_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    echo "kvstream multi-GPU ($MG_KIND) at $MG_SHA into $OUT; NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-unset}"
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
}

mg_wanted() {
    [ "$MG_PARTS" = "  " ] || [[ "$MG_PARTS" == *" $1 "* ]]
}

mg_topic() {
    local name=$1 secs=$2
    shift 2
    local log="$OUT/logs-$MG_KIND/$name.log" t0=$SECONDS rc
    echo "== $name (at most ${secs}s): $*"
    [ "${MG_QUICK:-0}" = 1 ] && set -- "$@" --quick
    timeout -k 20 "$secs" "$@" >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    MG_STATUS+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - t0))}")
}

mg_failover() {
    if [ -f kvstream/bench/failover.py ]; then
        mg_topic failover "$1" "$MG_PY" -m kvstream.bench.failover --out "$OUT"
    else
        echo "== failover: kvstream/bench/failover.py is not in this tree (issue 10's branch not merged); skipped"
    fi
}

mg_finish() {
    local joined failed=0 s
    joined=$(IFS=,; echo "${MG_STATUS[*]}")
    for s in "${MG_STATUS[@]}"; do [[ "$s" == *'"exit": 0,'* ]] || failed=1; done
    local gpus
    gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | paste -sd';' - || true)
    cat >"$OUT/manifest-$MG_KIND.json" <<EOF
{"kind": "$MG_KIND", "gpus": "${gpus:-none}", "started": "$MG_START", "ended": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
 "git_sha": "$MG_SHA", "nccl_nvls_enable": "${NCCL_NVLS_ENABLE:-unset}", "topics": {$joined}}
EOF
    local packed=()
    for d in "logs-$MG_KIND" disagg-runs; do [ -e "$OUT/$d" ] && packed+=("$d"); done
    if [ ${#packed[@]} -gt 0 ]; then
        tar czf "$OUT/$MG_KIND-runs.tar.gz" -C "$OUT" "${packed[@]}" && (cd "$OUT" && rm -rf "${packed[@]}")
    fi
    echo "results in $OUT:"
    ls -la "$OUT"
    cat "$OUT/manifest-$MG_KIND.json"
    return $failed
}
