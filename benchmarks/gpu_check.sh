#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the project's one prepared GPU check.
#
# On a machine with a CUDA GPU, in at most 8 minutes (GPU_CHECK_BUDGET seconds, default 480):
#   0. setup      a Python environment whose torch sees the GPU: .venv when it already works, else
#                 `make setup`, else (no registry: the lent GPU machines) a venv over the machine's own
#                 CUDA torch, with the packages it lacks installed from wheels in .whl/
#   1. info       nvidia-smi, torch's version, CUDA build and device; stops at once without CUDA
#   2. tests      the tests that need a GPU (found by grep in tests/), pytest with timeouts
#   3. fits       pyro-lag fit --accelerator gpu: the embedded synthetic corpus for 1 epoch, and Penn
#                 Treebank (lstm-text, small preset, --policy budget) for 1 epoch
#   4. benchmarks the benchmarks that take --device cuda, reduced repeats, as many as the time left allows
#   5. summary    benchmarks/results/gpu/summary.txt: each step's status and wall time
# Every step has its own timeout; a failing step does not stop the later ones (except no environment
# or no CUDA, after which nothing can run). Exits non-zero if any step failed.
#
# Run it from anywhere:   bash benchmarks/gpu_check.sh
#
# Results go to benchmarks/results/gpu/ (emptied first). When OUT is set, summary.txt, the pytest
# summary and gpu-results.tar.gz (the whole folder) are copied there as well.
#
# Environment:
#   GPU_CHECK_BUDGET  total seconds for all steps (default 480)
#   PYRO_LAG_DATA     folder holding ptb/ptb.train.txt, ptb.valid.txt, ptb.test.txt (default: the first of
#                     ../shared/data, shared/data, .data that has them). ../shared does not travel to a lent
#                     machine: carry a copy inside the checkout (e.g. .data/ptb) there.
#   GPU_CHECK_WHEELS  wheels for the packages a machine without a registry lacks (default .whl):
#                     pyro-ppl, pyro-api, arviz, xarray-einstats, h5netcdf, netcdf4, cftime, platformdirs
#   GPU_CHECK_EPOCHS_SYNTHETIC, GPU_CHECK_EPOCHS_PTB   epochs of the two fits (default 1 and 1)
#   GPU_CHECK_PTB_FLAGS   extra flags of the PTB fit (default "--policy budget")
# shellcheck disable=SC2317  # the step functions are called through run_step
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

RES=benchmarks/results/gpu
BUDGET=${GPU_CHECK_BUDGET:-480}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
EPOCHS_SYNTHETIC=${GPU_CHECK_EPOCHS_SYNTHETIC:-1}
EPOCHS_PTB=${GPU_CHECK_EPOCHS_PTB:-1}
PTB_FLAGS=${GPU_CHECK_PTB_FLAGS:---policy budget}
RESERVE=10       # seconds kept back at the end for the summary and the copies to $OUT
MIN_STEP=15      # a step with less time than this left is skipped

# Each step's time budget (seconds); a step gets less when less is left of the total.
BUDGET_SETUP=75
BUDGET_INFO=25
BUDGET_TESTS=60
BUDGET_FIT_SYNTHETIC=140
BUDGET_FIT_PTB=140
BUDGET_BENCHMARKS=180

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
START=$(date +%s)
DEADLINE=$((START + BUDGET - RESERVE))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyro-lag-gpu-check.XXXXXX")
PY=""            # the environment's python, set by step0_setup
PYRO_LAG=""      # its pyro-lag command
PTB=""           # the PTB folder, set by find_ptb
FAILED=0
STEP_BUDGET=0    # the running step's timeout
STEP_NOTE=""     # one line a step leaves for the summary

rm -rf "$RES" && mkdir -p "$RES"
SUMMARY_ROWS="$WORK/rows.txt"
: >"$SUMMARY_ROWS"

# ------------------------------------------------------------------------------ helpers

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

record() {  # record NAME STATUS WALL BUDGET NOTE: one row of summary.txt
    printf '%-30s %-8s %7s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" >>"$SUMMARY_ROWS"
}

status_of() {  # status_of RC: ok, TIMEOUT (timeout's 124, or 137 after its kill) or FAIL
    case $1 in 0) echo ok ;; 124 | 137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

run_step() {  # run_step NAME WANTED_BUDGET FUNCTION: run it under the time left, record status and wall time
    local name=$1 want=$2 fn=$3 left start rc status wall
    left=$((DEADLINE - $(date +%s)))
    STEP_BUDGET=$((want < left ? want : left))
    if ((STEP_BUDGET < MIN_STEP)); then
        echo "=== $name: skipped, ${left}s left of the total budget"
        record "$name" SKIPPED 0 "$want" "not run: ${left}s left of the ${BUDGET}s budget"
        FAILED=$((FAILED + 1))
        return 1
    fi
    echo "=== $name (budget ${STEP_BUDGET}s)"
    STEP_NOTE=""
    start=$(now)
    "$fn"
    rc=$?
    wall=$(elapsed "$start")
    status=$(status_of "$rc")
    [ "$status" = TIMEOUT ] && STEP_NOTE="timed out after ${STEP_BUDGET}s; ${STEP_NOTE}"
    [ "$status" = ok ] || FAILED=$((FAILED + 1))
    echo "=== $name: $status in ${wall}s${STEP_NOTE:+ ($STEP_NOTE)}"
    record "$name" "$status" "$wall" "$STEP_BUDGET" "$STEP_NOTE"
    return "$rc"
}

capped() {  # capped SECONDS CMD...: CMD under min(SECONDS, the running step's budget)
    local want=$1
    shift
    timeout -k 5 "$((want < STEP_BUDGET ? want : STEP_BUDGET))" "$@"
}

env_works() {  # env_works PYTHON: it imports the project, and its torch is a CUDA build
    [ -x "$1" ] && timeout 90 "$1" -c '
import sys, torch, pyro, arviz, pyro_lag, pyro_lag.cli.main
sys.exit(0 if torch.version.cuda else 3)' >>"$RES/setup.log" 2>&1
}

find_ptb() {  # sets PTB to the first data folder that holds ptb/ptb.{train,valid,test}.txt
    local d
    for d in ${PYRO_LAG_DATA:+"$PYRO_LAG_DATA"} ../shared/data shared/data .data; do
        if [ -f "$d/ptb/ptb.train.txt" ] && [ -f "$d/ptb/ptb.valid.txt" ] && [ -f "$d/ptb/ptb.test.txt" ]; then
            PTB=$(cd "$d/ptb" && pwd)
            break
        fi
    done
    # The tests read ../shared/data: where that is missing and a copy travelled inside the checkout, point it there.
    if [ -n "$PTB" ] && [ ! -e ../shared ]; then
        mkdir -p ../shared && ln -s "$(dirname "$PTB")" ../shared/data &&
            echo "linked ../shared/data -> $(dirname "$PTB") (for the tests' shared_data fixture)"
    fi
}

# ------------------------------------------------------------------------------ step 0: environment

step0_setup() {
    local base venv site
    if env_works .venv/bin/python; then
        PY=.venv/bin/python
        STEP_NOTE=".venv already works"
    else
        if [ ! -f .venv/.installed ] && command -v make >/dev/null; then
            # The Makefile pip-installs torch==2.13.0 (the local CPU build) then the project; offline that
            # fails, so let pip give up quickly instead of retrying.
            echo "make setup (log: $RES/setup.log)"
            PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=5 capped 40 make setup >>"$RES/setup.log" 2>&1 ||
                echo "make setup failed or timed out (see $RES/setup.log); trying the machine's own torch"
        fi
        if env_works .venv/bin/python; then
            PY=.venv/bin/python
            STEP_NOTE="make setup"
        else
            # A venv that sees the machine's python3 packages (its CUDA torch) through a .pth file, plus
            # wheels for what that python lacks, plus this project (editable, no dependencies, offline).
            base=$(command -v python3)
            if ! timeout 60 "$base" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
                echo "FAIL: no Python here has a CUDA build of torch (.venv: none or CPU-only; python3: $base)"
                STEP_NOTE="no CUDA build of torch"
                return 1
            fi
            venv=${TMPDIR:-/tmp}/pyro-lag-gpu-venv
            rm -rf "$venv"
            "$base" -m venv --without-pip "$venv" >>"$RES/setup.log" 2>&1 || { STEP_NOTE="venv failed"; return 1; }
            site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            "$base" -c 'import os, sys
print("\n".join(p for p in sys.path if os.path.isdir(p) and p.rstrip("/").endswith(("site-packages", "dist-packages"))))' \
                >"$site/_gpu_check_base.pth"
            if compgen -G "$WHEELS/*.whl" >/dev/null; then
                capped 60 "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl \
                    >>"$RES/setup.log" 2>&1 || { STEP_NOTE="installing $WHEELS/*.whl failed"; return 1; }
            else
                echo "no wheels in $WHEELS/: relying on what $base has"
            fi
            capped 60 "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
                >>"$RES/setup.log" 2>&1 || { STEP_NOTE="pip install -e . failed"; return 1; }
            if ! env_works "$venv/bin/python"; then
                echo "FAIL: the environment cannot import the project: $(tail -n 1 "$RES/setup.log")"
                STEP_NOTE="import failed: $(tail -n 1 "$RES/setup.log")"
                return 1
            fi
            PY=$venv/bin/python
            STEP_NOTE="venv over $base"
        fi
    fi
    PYRO_LAG=$(dirname "$PY")/pyro-lag
    STEP_NOTE="$STEP_NOTE; $("$PY" -c 'import torch, pyro; print(f"torch {torch.__version__}, pyro {pyro.__version__}")')"
    "$PY" -m pip list 2>/dev/null >"$RES/pip-list.txt"
}

# ------------------------------------------------------------------------------ step 1: the device

step1_info() {
    if command -v nvidia-smi >/dev/null; then
        capped 20 nvidia-smi 2>&1 | tee "$RES/nvidia-smi.txt"
    else
        echo "nvidia-smi not found" | tee "$RES/nvidia-smi.txt"
    fi
    capped 60 "$PY" - <<'EOF' 2>&1 | tee "$RES/torch-cuda.txt"
import sys, torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    print("FAIL: torch.cuda.is_available() is False: no usable GPU for this torch")
    sys.exit(1)
props = torch.cuda.get_device_properties(0)
print(f"device 0: {torch.cuda.get_device_name(0)}, capability {props.major}.{props.minor}, "
      f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)")
EOF
    local rc=$?
    STEP_NOTE=$(tail -n 1 "$RES/torch-cuda.txt")
    return "$rc"
}

# ------------------------------------------------------------------------------ step 2: the CUDA tests

gpu_tests() {  # pytest node ids of the tests that need a GPU
    local files
    files=$(grep -rlE 'torch\.cuda\.is_available\(\)' tests --include='test_*.py' | sort)
    [ -n "$files" ] || return 0
    # skipif(not torch.cuda.is_available()) tests, module-level pytestmark skips, and tests that pick
    # "cuda" when it is available (module-level functions only).
    # shellcheck disable=SC2086
    awk '
        FNR == 1 { pending = 0; current = ""; whole = 0 }
        whole { next }
        /^pytestmark.*not torch\.cuda\.is_available\(\)/ { print FILENAME; whole = 1; next }
        /^[[:space:]]*@pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)/ { pending = 1; next }
        /^[[:space:]]*@/ { next }
        /^[[:space:]]*(async[[:space:]]+)?def[[:space:]]+test_/ {
            name = $0; sub(/^[[:space:]]*(async[[:space:]]+)?def[[:space:]]+/, "", name); sub(/\(.*/, "", name)
            current = (/^def/ || /^async/) ? name : ""
            if (pending && current != "") { print FILENAME "::" current; seen[FILENAME "::" current] = 1 }
            pending = 0; next
        }
        /^[^[:space:]#]/ { current = ""; pending = 0 }
        current != "" && /torch\.cuda\.is_available\(\)/ && !/skipif/ && !seen[FILENAME "::" current] {
            print FILENAME "::" current; seen[FILENAME "::" current] = 1
        }' $files
}

step2_tests() {
    local ids timeout_flag=() rc last
    mapfile -t ids < <(gpu_tests)
    printf '%s\n' "${ids[@]}" >"$RES/pytest-cuda-tests.txt"
    if ((${#ids[@]} == 0)); then
        STEP_NOTE="no GPU tests found in tests/"
        return 1
    fi
    echo "GPU tests: ${ids[*]}"
    "$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout 60)
    capped "$BUDGET_TESTS" "$PY" -m pytest -q -rA "${timeout_flag[@]}" --junitxml="$RES/pytest-cuda.xml" "${ids[@]}" \
        2>&1 | tee "$RES/pytest-cuda.txt"
    rc=${PIPESTATUS[0]}
    last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$RES/pytest-cuda.txt" | tail -n 1 | tr -d '=' | xargs)
    STEP_NOTE="${#ids[@]} test(s): ${last:-no pytest summary}"
    # A GPU test skipped on a GPU machine did not check anything: say so, as a failure.
    if ((rc == 0)) && grep -qE '[0-9]+ skipped' <<<"$last"; then
        STEP_NOTE="$STEP_NOTE (skips: see $RES/pytest-cuda.txt)"
        return 1
    fi
    return "$rc"
}

# ------------------------------------------------------------------------------ step 3: training runs

fit_metrics() {  # fit_metrics RUN_DIR: training time and the final (or last epoch's) KL, MI, AU, IW-NLL
    [ -f "$1/metrics.json" ] || { echo "no metrics.json"; return; }
    "$PY" - "$1/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
history = m.get("history") or []
final, where = m.get("final"), "final"
if not final:
    final, where = (history[-1] if history else {}), "last epoch, no final evaluation"
parts = [f"training {m.get('training_time', 0.0):.1f}s over {len(history)} epoch(s)"]
for key, label in (("kl", "KL"), ("mi", "MI"), ("au", "AU"), ("iw_nll", "IW-NLL")):
    if isinstance(final.get(key), (int, float)):
        parts.append(f"{label} {final[key]:.4g}")
print(", ".join(parts) + f" ({where})")
EOF
}

fit_run() {  # fit_run NAME ARGS...: pyro-lag fit ARGS into a temp run directory; copy its results to $RES/NAME
    local name=$1 rc dest=$RES/$1 run=$WORK/$1
    shift
    mkdir -p "$dest"
    echo "$PYRO_LAG fit $* --out $run"
    capped "$STEP_BUDGET" "$PYRO_LAG" fit "$@" --out "$run" 2>&1 | tee "$dest/fit.log"
    rc=${PIPESTATUS[0]}
    if [ -d "$run" ]; then
        cp "$run"/*.json "$run"/*.csv "$run"/report.html "$dest"/ 2>/dev/null
    fi
    grep -E 'best epoch' "$dest/fit.log" | tail -n 1 >"$dest/summary.txt"
    STEP_NOTE=$(fit_metrics "$dest")
    echo "$STEP_NOTE" >>"$dest/summary.txt"
    return "$rc"
}

step3_fit_synthetic() {
    fit_run fit-synthetic --accelerator gpu --epochs "$EPOCHS_SYNTHETIC"
}

step3_fit_ptb() {
    if [ -z "$PTB" ]; then
        STEP_NOTE="PTB not found (PYRO_LAG_DATA, ../shared/data, shared/data, .data): carry a copy"
        echo "FAIL: $STEP_NOTE"
        return 1
    fi
    # shellcheck disable=SC2086
    fit_run fit-ptb lstm-text --preset small --train "$PTB/ptb.train.txt" --valid "$PTB/ptb.valid.txt" \
        --test "$PTB/ptb.test.txt" --accelerator gpu --epochs "$EPOCHS_PTB" $PTB_FLAGS
}

# ------------------------------------------------------------------------------ step 4: benchmarks

# name (of its JSON) | script | its own timeout (s) | options that keep it quick
BENCHMARKS=(
    "inner_vs_full_step|bench_inner_step.py|40|--repeats 10"
    "pyro_overhead|bench_pyro_overhead.py|40|--repeats 6"
    "user_model|bench_user_model.py|50|--repeats 5"
    "reference_loop|bench_reference_loop.py|60|--repeats 10 --epochs 1"
    "diagnostics|bench_diagnostics.py|60|--repeats 2 --iw-batches 1"
    "aggressive_vs_standard|bench_aggressive_vs_standard.py|90|--epochs 2 --max-inner-steps 20"
)

step4_benchmarks() {
    local entry name script cap opts left limit start rc status wall ran=0 bad=0 skipped=0
    local data=${PTB:-benchmarks/no-ptb-found}
    local step_end=$(($(date +%s) + STEP_BUDGET))
    for entry in "${BENCHMARKS[@]}"; do
        IFS='|' read -r name script cap opts <<<"$entry"
        left=$((step_end - $(date +%s)))
        if ((left < MIN_STEP)); then
            record "  bench $name" SKIPPED 0 "$cap" "${left}s left"
            skipped=$((skipped + 1))
            continue
        fi
        limit=$((cap < left ? cap : left))
        echo "--- $name (timeout ${limit}s)"
        start=$(now)
        # shellcheck disable=SC2086
        timeout -k 5 "$limit" "$PY" "benchmarks/$script" --device cuda --threads 1 --size small --batch-size 32 \
            --data "$data" --out "$RES" $opts 2>&1 | tee "$RES/$name.log"
        rc=${PIPESTATUS[0]}
        wall=$(elapsed "$start")
        status=$(status_of "$rc")
        record "  bench $name" "$status" "$wall" "$limit" "$(tail -n 1 "$RES/$name.log" | cut -c1-160)"
        ran=$((ran + 1))
        [ "$status" = ok ] || bad=$((bad + 1))
    done
    # The Markdown table of whatever JSON was written, as benchmarks/results/README.md has it for the CPU.
    timeout 30 "$PY" benchmarks/run_all.py --table-only --out "$RES" >/dev/null 2>&1 || true
    STEP_NOTE="$ran run, $bad failed, $skipped skipped for time; table in $RES/README.md"
    ((bad == 0))
}

# ------------------------------------------------------------------------------ step 5: summary

step5_summary() {
    local total overall
    total=$(($(date +%s) - START))
    overall=$([ "$FAILED" -eq 0 ] && echo "PASSED" || echo "FAILED ($FAILED step(s))")
    {
        echo "pyro-lag GPU check: $overall in ${total}s (budget ${BUDGET}s)"
        echo "when: $(date -Is)   host: $(hostname)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        echo "python: ${PY:-none}   PTB: ${PTB:-not found}"
        echo
        printf '%-30s %-8s %7s %7s  %s\n' step status wall_s limit_s note
        cat "$SUMMARY_ROWS"
    } >"$RES/summary.txt"
    echo
    cat "$RES/summary.txt"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        # At most 8 files come back from a lent machine's $OUT: the summary, the pytest summary, and the rest as one tarball.
        cp "$RES/summary.txt" "$OUT/summary.txt"
        [ -f "$RES/pytest-cuda.txt" ] && cp "$RES/pytest-cuda.txt" "$OUT/pytest-cuda.txt"
        tar -czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
        echo "copied to $OUT: $(cd "$OUT" && ls -m summary.txt pytest-cuda.txt gpu-results.tar.gz 2>/dev/null)"
    fi
}

finish() {
    step5_summary
    rm -rf "$WORK"
    exit $((FAILED > 0 ? 1 : 0))
}

# ------------------------------------------------------------------------------ main

run_step setup "$BUDGET_SETUP" step0_setup || finish
run_step info "$BUDGET_INFO" step1_info || finish
find_ptb
run_step tests "$BUDGET_TESTS" step2_tests
run_step fit-synthetic "$BUDGET_FIT_SYNTHETIC" step3_fit_synthetic
run_step fit-ptb "$BUDGET_FIT_PTB" step3_fit_ptb
run_step benchmarks "$BUDGET_BENCHMARKS" step4_benchmarks
finish
