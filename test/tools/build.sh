#!/usr/bin/env bash
# Builds the real servers the end-to-end tests run (etcd, kube-apiserver,
# pilot-agent) from the Go module proxy into a git-ignored folder, and reuses a
# binary that is already there. Usage: test/tools/build.sh [name...]
# Output folder: $MESHCA_BIN (default: <repo>/.cache/bin).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${MESHCA_BIN:-$repo/.cache/bin}
mkdir -p "$out"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(etcd kube-apiserver pilot-agent)

build() {
	local name=$1 pkg
	case $name in
	etcd) pkg=. ;;
	kube-apiserver) pkg=k8s.io/kubernetes/cmd/kube-apiserver ;;
	pilot-agent) pkg=istio.io/istio/pilot/cmd/pilot-agent ;;
	*) echo "build.sh: unknown tool $name (want etcd, kube-apiserver or pilot-agent)" >&2; return 2 ;;
	esac
	# The stamp ties a binary to the go.sum it was built from, so a version
	# bump rebuilds instead of silently testing against the old server.
	local stamp
	stamp=$(cat "$here/$name/go.mod" "$here/$name/go.sum" | sha256sum | cut -c1-16)
	if [ -x "$out/$name" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
		echo "build.sh: $name up to date"
		return 0
	fi
	echo "build.sh: building $name (cold: minutes)"
	local t0=$SECONDS
	(cd "$here/$name" && GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$out/$name.tmp" "$pkg")
	mv "$out/$name.tmp" "$out/$name"
	echo "$stamp" >"$out/$name.stamp"
	echo "build.sh: built $name in $((SECONDS - t0))s"
}

for n in "${names[@]}"; do build "$n"; done
