#!/usr/bin/env bash
# The full-environment phase of `make test` (every package's tests but mttt_jax's, and tests/), once with
# pytest-xdist's PYTEST_WORKERS processes (default 2, --dist loadfile, as the Makefile runs it) and once in one
# process, one after the other on the same machine, each timed by /usr/bin/time.  Needs `make setup`.
# Usage: bash benchmarks/bench_test_suite.sh [PYTEST_WORKERS]     (~13 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1
workers="${1:-2}"
tests="$(ls -d packages/*/tests | grep -v mttt_jax) tests"
for mode in "-n $workers --dist loadfile" "-n 0"; do
  echo "== pytest $mode  (start $(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2086
  /usr/bin/time -f "wall %e s, CPU %P" .venv/bin/python -m pytest -q -p no:cacheprovider $mode \
    -m "not gpu and not repro" $tests 2>&1 | grep -E "passed|failed|^wall"
done
