#!/usr/bin/env bash
# `make test`: the test suite as two pytest processes side by side. The Slurm tests (tests/slurm,
# run as root against a local cluster) spend most of their time waiting for the scheduler and its
# status polls; the rest of the suite runs meanwhile. Each process ends with its short summary
# (-ra) and its 25 slowest tests; the Slurm tests' output, kept in a log while the rest runs,
# follows. The script fails when either fails. Options go to both, e.g. `-k batch`; given test
# files or folders, it runs just those, in one pytest process.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
# Rules call the `sciquant` command: the environment's bin folder first on PATH (as `make` does).
PATH="$(cd "$(dirname "$PYTHON_BIN")" && pwd):$PATH"
export PATH
ARGS=(-ra --durations=25 "$@")

for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then  # chosen tests (a path, or path::name): those alone
        exec "$PYTHON_BIN" -m pytest "${ARGS[@]}"
    fi
done

log=$(mktemp -t sciquant-slurm-tests.XXXXXX.log)
# A background job of a script ignores SIGINT; this one takes it back, so that Ctrl-C stops both
# parts and the Slurm tests' fixtures still stop their cluster.
"$PYTHON_BIN" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' "${ARGS[@]}" tests/slurm >"$log" 2>&1 &
slurm=$!
trap 'kill -INT "$slurm" 2>/dev/null; wait "$slurm"; exit 130' INT TERM
echo "The Slurm tests (tests/slurm) run beside the others; their output: $log"

"$PYTHON_BIN" -m pytest "${ARGS[@]}" --ignore=tests/slurm
rest=$?

echo
echo "================ the Slurm tests (tests/slurm), run beside the others ================"
wait "$slurm"
slurm_rc=$?
cat "$log"

# 5: no test selected (e.g. `-k` matching tests of one part only)
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
if ok "$rest" && ok "$slurm_rc" && ! { [ "$rest" -eq 5 ] && [ "$slurm_rc" -eq 5 ]; }; then
    rm -f "$log"
    exit 0
fi
echo "tests failed: the rest exited $rest, the Slurm tests $slurm_rc (their log: $log)" >&2
exit 1
