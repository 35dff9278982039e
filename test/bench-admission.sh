#!/usr/bin/env bash
# Starts bin/meshca in dev mode in a scratch folder and runs
# `meshctl bench-admission`: new pods' first certificates at a steady rate,
# idle and then during a renewal storm that saturates meshca.
# Extra flags: BENCH_ARGS="--renewers 128 --pod-rate 200".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/.cache/bench-admission
rm -rf "$work" && mkdir -p "$work" && cd "$work"
"$repo/bin/meshca" serve --dev --log-level warn >audit.log 2>meshca.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
	kill -0 $pid 2>/dev/null || { echo "bench-admission: meshca exited (is another meshca on ports 15012/15014?)" >&2; cat meshca.log >&2; exit 1; }
	curl -sf http://127.0.0.1:15014/readyz >/dev/null 2>&1 && break
	sleep 0.1
done
# shellcheck disable=SC2086
"$repo/bin/meshctl" bench-admission ${BENCH_ARGS:-}
echo "shed by admission control: $(curl -s http://127.0.0.1:15014/metrics | grep '^meshca_admission_shed_total' | tr '\n' ' ')"
