#!/usr/bin/env bash
# Builds the real servers and tools the end-to-end tests run (etcd,
# kube-apiserver, pilot-agent, helm, vault) from the Go module proxy into a
# git-ignored folder, and reuses a binary that is already there.
# istiod-ca (istiod's CA server, for make bench-vs-istiod) is built only
# when named: no test needs it.
# Usage: test/tools/build.sh [name...]
# Output folder: $MESHCA_BIN (default: <repo>/.cache/bin).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${MESHCA_BIN:-$repo/.cache/bin}
mkdir -p "$out"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(etcd kube-apiserver pilot-agent helm vault)

# helm_ldflags prints the -X flags helm's own Makefile links in. Without
# them `helm version` says v3.22 and helm assumes Kubernetes 1.20 for a
# chart's kubeVersion and for lint's deprecation checks.
helm_ldflags() {
	local helm k8s
	helm=$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
	k8s=$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go) # v0.MINOR.PATCH
	k8s=${k8s#v0.}
	k8s=${k8s%%.*}
	local x
	for x in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
		printf ' -X %s.k8sVersionMajor=1 -X %s.k8sVersionMinor=%s' "$x" "$x" "$k8s"
	done
	printf ' -X helm.sh/helm/v3/internal/version.version=%s -X helm.sh/helm/v3/internal/version.metadata=' "$helm"
}

build() {
	local name=$1 pkg extra= src=()
	case $name in
	etcd) pkg=. ;;
	kube-apiserver) pkg=k8s.io/kubernetes/cmd/kube-apiserver ;;
	pilot-agent) pkg=istio.io/istio/pilot/cmd/pilot-agent ;;
	istiod-ca) pkg=. src=(main.go) ;;
	vault) pkg=. ;;
	helm) pkg=helm.sh/helm/v3/cmd/helm extra=$(helm_ldflags) ;;
	*) echo "build.sh: unknown tool $name (want etcd, kube-apiserver, pilot-agent, helm, vault or istiod-ca)" >&2; return 2 ;;
	esac
	# The stamp ties a binary to the go.sum (and extra link flags, and the
	# wrapper's own source where it has more than a one-line main) it was
	# built from, so a version bump rebuilds instead of silently testing
	# against the old server.
	local stamp
	stamp=$({ cat "$here/$name/go.mod" "$here/$name/go.sum" "${src[@]/#/$here/$name/}"; printf '%s' "$extra"; } | sha256sum | cut -c1-16)
	if [ -x "$out/$name" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
		echo "build.sh: $name up to date"
		return 0
	fi
	echo "build.sh: building $name (cold: minutes)"
	local t0=$SECONDS
	(cd "$here/$name" && GOFLAGS=-mod=mod go build -trimpath -ldflags="-s -w$extra" -o "$out/$name.tmp" "$pkg")
	mv "$out/$name.tmp" "$out/$name"
	echo "$stamp" >"$out/$name.stamp"
	echo "build.sh: built $name in $((SECONDS - t0))s"
}

for n in "${names[@]}"; do build "$n"; done
