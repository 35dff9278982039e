#!/usr/bin/env bash
# Puts meshca and istiod's own CA server under the same `meshctl bench`
# load, one server at a time, alternating (meshca, istiod, meshca, istiod,
# ...), and prints certs/s, p50/p99 and server CPU per certificate of every
# run, the means, and the ratios meshca/istiod.
#
# istiod's side is test/tools/istiod-ca: istio.io/istio's
# security/pkg/server/ca with a plugged ECDSA P-256 CA and istiod's JWT
# authenticator verifying the same dev tokens locally (see its main.go).
# It is built (or reused) in $MESHCA_BIN by test/tools/build.sh istiod-ca.
# meshca is bin/meshca serve --dev, with audit lines going to a file.
# Everything binds to 127.0.0.1: meshca on 15112 (admin 15114), away from
# make run's 15012, and istiod-ca on 15212 (monitoring 15214).
#
# ROUNDS (default 2) pairs of runs; CONCURRENCY clients (default 64), each
# with its own TLS connection; DURATION (10s) measured after WARMUP (2s).
# PROFILE=N takes a 10s CPU profile of each server, N seconds after the
# load of its first run starts (warm-up included). STORM=250,1000 also
# runs meshctl bench --storm with those sizes against each server, on a
# fresh start of it, in every round.
#
# PIN (default 1) runs the server on CPU 0 and the load generator on CPU 1
# (taskset): each server then has one core of its own, and the load
# generator's CPU (about 80 µs per certificate, mostly loopback TCP) is
# not taken from it, as when proxies run on other nodes. PIN=0 lets both
# share all cores; the load generator's CPU then counts against both
# servers alike and narrows the ratio. Without taskset, or on one core,
# PIN is ignored.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${MESHCA_BIN:-$repo/.cache/bin}
rounds=${ROUNDS:-2}
conc=${CONCURRENCY:-64}
duration=${DURATION:-10s}
warmup=${WARMUP:-2s}
for b in meshca meshctl; do
	[ -x "$repo/bin/$b" ] || { echo "bench-vs-istiod: no bin/$b (run make build, or make bench-vs-istiod)" >&2; exit 1; }
done
MESHCA_BIN=$bin "$repo/test/tools/build.sh" istiod-ca >&2

work=$repo/.cache/bench-vs-istiod
rm -rf "$work" && mkdir -p "$work" && cd "$work"

srv_cpu=() cli_cpu=()
pin=${PIN:-1}
if [ "$pin" != 0 ] && { ! command -v taskset >/dev/null || [ "$(nproc)" -lt 2 ]; }; then
	echo "bench-vs-istiod: no taskset or a single core: server and load generator share the cores" >&2
	pin=0
fi
if [ "$pin" != 0 ]; then
	srv_cpu=(taskset -c 0) cli_cpu=(taskset -c 1)
fi

pid=
stop_server() {
	[ -n "$pid" ] || return 0
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	pid=
}
trap stop_server EXIT

# start_server NAME: starts it in the background and waits until it is
# ready; the answer must come from our process, not another on the port.
start_server() {
	local ready log
	case $1 in
	meshca)
		"${srv_cpu[@]}" "$repo/bin/meshca" serve --dev --pprof --log-level warn --grpc-address 127.0.0.1:15112 \
			--admin-address 127.0.0.1:15114 >meshca-audit.log 2>meshca.log &
		ready=http://127.0.0.1:15114/readyz log=meshca.log ;;
	istiod)
		[ -f .meshca-dev/jwks.json ] || { echo "bench-vs-istiod: no .meshca-dev/jwks.json (meshca runs first)" >&2; exit 1; }
		"${srv_cpu[@]}" "$bin/istiod-ca" --pprof --dir .istiod-ca --jwks .meshca-dev/jwks.json >istiod.log 2>&1 &
		ready=http://127.0.0.1:15214/ready log=istiod.log ;;
	esac
	pid=$!
	for _ in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || break
		curl -sf "$ready" >/dev/null 2>&1 && break
		sleep 0.1
	done
	sleep 0.2
	if ! kill -0 "$pid" 2>/dev/null || ! curl -sf "$ready" >/dev/null 2>&1; then
		echo "bench-vs-istiod: $1 did not start (ports 15112/15114 for meshca, 15212/15214 for istiod-ca in use?)" >&2
		cat "$log" >&2
		exit 1
	fi
}

# server_args NAME: meshctl bench's flags for that server.
server_args() {
	case $1 in
	meshca) echo --addr 127.0.0.1:15112 --metrics http://127.0.0.1:15114/metrics ;;
	istiod) echo --addr 127.0.0.1:15212 --ca-cert .istiod-ca/root-cert.pem --metrics http://127.0.0.1:15214/metrics ;;
	esac
}

# run_bench NAME ROUND: one measured run against the server that is up;
# prints the data row of meshctl bench.
run_bench() {
	local args=(--concurrency "$conc" --conns "$conc" --duration "$duration" --warmup "$warmup") admin
	# shellcheck disable=SC2207
	args+=($(server_args "$1"))
	case $1 in
	meshca) admin=http://127.0.0.1:15114 ;;
	istiod) admin=http://127.0.0.1:15214 ;;
	esac
	local profiler=
	if [ -n "${PROFILE:-}" ] && [ "$2" = 1 ]; then
		(sleep "$PROFILE" && curl -s -o "$1-cpu.prof" "$admin/debug/pprof/profile?seconds=10") &
		profiler=$!
	fi
	"${cli_cpu[@]}" "$repo/bin/meshctl" bench "${args[@]}" 2>>bench.log | tail -n 1
	[ -z "$profiler" ] || wait "$profiler"
}

if [ "$pin" != 0 ]; then
	echo "bench-vs-istiod: $(nproc)-core machine, server pinned to CPU 0, load generator to CPU 1 (PIN=0 to share); $(date -u +%Y-%m-%d)"
else
	echo "bench-vs-istiod: $(nproc)-core machine, servers and load generator on the same cores; $(date -u +%Y-%m-%d)"
fi
echo "$conc clients, one TLS connection each; $duration measured after $warmup of warm-up; one server at a time, alternating"
fmt="%-6s %-7s %9s %10s %10s %16s %7s\n"
printf "$fmt" round server certs/s p50 p99 "server CPU/cert" errors
results=() storms=()
for round in $(seq 1 "$rounds"); do
	for server in meshca istiod; do
		start_server "$server"
		row=$(run_bench "$server" "$round")
		stop_server
		if [ -n "${STORM:-}" ]; then
			start_server "$server"
			# shellcheck disable=SC2046
			while read -r line; do storms+=("$(printf '%-6s %-7s %s' "$round" "$server" "$line")"); done < <(
				"${cli_cpu[@]}" "$repo/bin/meshctl" bench --storm "$STORM" $(server_args "$server") 2>>bench.log | tail -n +2)
			stop_server
		fi
		# concurrency, certs/s, p50 ms, p90 ms, p99 ms, CPU µs, RSS MiB, errors
		read -r _ certs p50 _ _ _ p99 _ cpu _ _ _ errs <<<"$row"
		printf "$fmt" "$round" "$server" "$certs" "$p50 ms" "$p99 ms" "$cpu µs" "$errs"
		results+=("$server $certs $p50 $p99 $cpu")
	done
done
printf '%s\n' "${results[@]}" | awk -v fmt="$fmt" '
	{ n[$1]++; c[$1] += $2; p50[$1] += $3; p99[$1] += $4; cpu[$1] += $5 }
	END {
		for (s in n) { c[s] /= n[s]; p50[s] /= n[s]; p99[s] /= n[s]; cpu[s] /= n[s] }
		printf fmt, "mean", "meshca", sprintf("%.0f", c["meshca"]), sprintf("%.2f ms", p50["meshca"]), sprintf("%.2f ms", p99["meshca"]), sprintf("%.0f µs", cpu["meshca"]), ""
		printf fmt, "mean", "istiod", sprintf("%.0f", c["istiod"]), sprintf("%.2f ms", p50["istiod"]), sprintf("%.2f ms", p99["istiod"]), sprintf("%.0f µs", cpu["istiod"]), ""
		printf "meshca/istiod: certs/s %.2fx, p99 %.2fx, server CPU per cert %.2fx\n", c["meshca"] / c["istiod"], p99["meshca"] / p99["istiod"], cpu["meshca"] / cpu["istiod"]
	}'
if [ ${#storms[@]} -gt 0 ]; then
	echo
	echo "storms: N new TLS connections at once, one CSR each, on a freshly started server"
	printf '%-6s %-7s %6s %13s %9s %14s %14s %9s %9s %16s %11s %7s\n' round server conns handshakes/s certs/s \
		"handshake p50" "handshake p99" "cert p50" "cert p99" "server CPU/cert" "server RSS" errors
	printf '%s\n' "${storms[@]}"
fi
if [ -n "${PROFILE:-}" ]; then
	echo "CPU profiles: $work/meshca-cpu.prof (go tool pprof -top $repo/bin/meshca $work/meshca-cpu.prof), $work/istiod-cpu.prof (with $bin/istiod-ca)"
fi
