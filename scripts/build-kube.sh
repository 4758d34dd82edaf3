#!/usr/bin/env bash
# Build kube-apiserver and etcd from the Go module proxy, cached outside the
# repository under ${VPBLU_CACHE:-~/.cache/vpblu}/bin, keyed by version.
# A second run with the same versions does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${VPBLU_CACHE:-$HOME/.cache/vpblu}
bin="$cache/bin"
mkdir -p "$bin"
apiserver="$bin/kube-apiserver-$KUBE_VERSION"
etcd="$bin/etcd-$ETCD_VERSION"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GONOSUMDB=k8s.io,go.etcd.io GOSUMDB=off

if [ ! -x "$apiserver" ]; then
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
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  (cd "$work" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" >/dev/null \
     && go build -trimpath -tags selinux,notest,grpcnotrace \
          -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION" \
          -o "$apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$apiserver.tmp" "$apiserver"
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
ln -sf "$apiserver" "$bin/kube-apiserver"
ln -sf "$etcd" "$bin/etcd"
echo "kube-apiserver $KUBE_VERSION, etcd $ETCD_VERSION in $bin"
