#!/usr/bin/env bash
# Build kube-apiserver, kube-proxy, kubelet, kube-controller-manager, kube-scheduler and
# etcd from the Go module proxy, cached outside the
# repository under ${VPBLU_CACHE:-~/.cache/vpblu}/bin, keyed by version.
# A second run with the same versions does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${VPBLU_CACHE:-$HOME/.cache/vpblu}
bin="$cache/bin"
mkdir -p "$bin"
etcd="$bin/etcd-$ETCD_VERSION"
# kube-apiserver for every cluster the tests run; kube-proxy in each test node,
# so Service traffic takes the path it takes on a user's cluster.
# kubelet, kube-controller-manager and kube-scheduler for the kubelet-node mode
# of the local cluster (issue 22): real nodes that run the manifests' pods.
components=(kube-apiserver kube-proxy kubelet kube-controller-manager kube-scheduler)

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GONOSUMDB=k8s.io,go.etcd.io GOSUMDB=off

missing=()
for c in "${components[@]}"; do [ -x "$bin/$c-$KUBE_VERSION" ] || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "building ${missing[*]} $KUBE_VERSION from the Go module proxy (cold: about 5-8 min a binary on 2 cores)..."
  work=$(mktemp -d "$cache/build-kube.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  staging_minor="v0.${KUBE_VERSION#v1.}"
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module vpblu.local/kubebuild"
    echo
    echo "go 1.24"
    echo
    echo "replace ("
    # The kubernetes go.mod points every staging module at ./staging/src; the
    # consumer module points each at its published v0.N.M twin instead.
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging_minor" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > "$work/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    for c in "${components[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$c\""; done
  } > "$work/tools.go"
  pkgs=()
  for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  mkdir -p "$work/out"
  echo "resolving k8s.io/kubernetes@$KUBE_VERSION and its modules..."
  (cd "$work" && go get "k8s.io/kubernetes@$KUBE_VERSION" >/dev/null \
     && echo "compiling (go build -v lists each package as it finishes)..." \
     && go build -v -trimpath -tags selinux,notest,grpcnotrace \
          -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION" \
          -o "$work/out/" "${pkgs[@]}")
  for c in "${missing[@]}"; do mv "$work/out/$c" "$bin/$c-$KUBE_VERSION"; echo "built $c"; done
  rm -rf "$work"; trap - EXIT
fi

if [ ! -x "$etcd" ]; then
  work=$(mktemp -d "$cache/build-etcd.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  printf 'module vpblu.local/etcdbuild\n\ngo 1.24\n' > "$work/go.mod"
  (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null \
     && go build -trimpath -ldflags "-s -w" -o "$etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$etcd.tmp" "$etcd"
  rm -rf "$work"; trap - EXIT
fi
for c in "${components[@]}"; do ln -sf "$bin/$c-$KUBE_VERSION" "$bin/$c"; done
ln -sf "$etcd" "$bin/etcd"
echo "${components[*]} $KUBE_VERSION, etcd $ETCD_VERSION in $bin"
