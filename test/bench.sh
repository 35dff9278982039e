#!/usr/bin/env bash
# Starts bin/meshca in dev mode in a scratch folder, drives it with
# `meshctl bench` (pre-generated P-256 CSRs, one reused TLS connection per
# concurrent client, tokens verified by the local JWKS authenticator), and
# stops it.
# Extra meshctl bench flags: BENCH_ARGS="--concurrency 64 --duration 30s",
# or BENCH_ARGS="--storm 250,1000" for bursts of new connections.
# PROFILE=N takes a 10s server CPU profile N seconds after the load starts.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/.cache/bench
rm -rf "$work" && mkdir -p "$work" && cd "$work"
# Audit lines go to a file, as in production; logs to meshca.log.
"$repo/bin/meshca" serve --dev --pprof --log-level warn >audit.log 2>meshca.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
	kill -0 $pid 2>/dev/null || { echo "bench: meshca exited (is another meshca, e.g. make run, on ports 15012/15014?)" >&2; cat meshca.log >&2; exit 1; }
	curl -sf http://127.0.0.1:15014/readyz >/dev/null 2>&1 && break
	sleep 0.1
done
# The answer must have come from our meshca, not another one on the port.
sleep 0.2
kill -0 $pid 2>/dev/null || { echo "bench: meshca exited (is another meshca, e.g. make run, on ports 15012/15014?)" >&2; cat meshca.log >&2; exit 1; }
echo "meshca $(nproc)-core machine, server and load generator on the same cores"
if [ -n "${PROFILE:-}" ]; then
	# A 10s CPU profile of the server, PROFILE seconds after the load starts.
	(sleep "$PROFILE" && curl -s -o cpu.prof "http://127.0.0.1:15014/debug/pprof/profile?seconds=10" &&
		echo "server CPU profile: $work/cpu.prof (go tool pprof -top $repo/bin/meshca $work/cpu.prof)") &
	profiler=$!
fi
# shellcheck disable=SC2086
"$repo/bin/meshctl" bench ${BENCH_ARGS:-}
[ -z "${profiler:-}" ] || wait "$profiler"
echo "audit lines written: $(wc -l <audit.log)"
