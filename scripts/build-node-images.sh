#!/usr/bin/env bash
# The two small images the kubelet-node local cluster (vpblu/lab/kubeletnodes.py)
# needs besides vpblu's own, built here because nothing can be pulled:
#   vpblu-lab/pause    the pod sandbox: catatonit -P (Debian's catatonit, static),
#                      which sleeps, reaps and exits on SIGTERM, as pause does
#   vpblu-lab/testpod  test pods: busybox-static (httpd, nc, wget, sleep, sh)
# Each is one layer of files taken from the Debian package (dpkg-deb -x, no
# maintainer scripts to run: both binaries are statically linked), stacked by
# umoci and written as an OCI archive by skopeo, reproducibly, cached under
# ${VPBLU_CACHE:-~/.cache/vpblu}/image keyed by the package versions and this script.
#
# Usage: scripts/build-node-images.sh [--print-pause|--print-testpod]
#   prints "<archive> <image name>" of one image (building it first if needed).
set -euo pipefail
cache=${VPBLU_CACHE:-$HOME/.cache/vpblu}/image
mkdir -p "$cache"
export SOURCE_DATE_EPOCH=1700000000
for tool in umoci skopeo apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/setup-system.sh" >&2; exit 1; }
done
self_hash=$(sha256sum "$0" | cut -c1-12)

# NAME PACKAGE ENTRYPOINT...
build() {
  local name=$1 package=$2; shift 2
  local version key archive ref work
  version=$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')
  [ -n "$version" ] && [ "$version" != "(none)" ] || { echo "no Debian package $package" >&2; exit 1; }
  key=$(printf '%s\n' "$self_hash" "$package" "$version" "$*" | sha256sum | cut -c1-12)
  ref="registry.vpblu.local/vpblu-lab/$name:$key"
  archive="$cache/lab-$name-$key.oci.tar"
  if [ ! -f "$archive" ]; then
    echo "[node images] $name from Debian's $package $version" >&2
    work=$(mktemp -d "$cache/build-$name.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    (cd "$work" && apt-get download -q "$package=$version" >/dev/null 2>&1) \
      || { echo "apt-get download $package=$version failed" >&2; exit 1; }
    mkdir -p "$work/root/tmp" "$work/root/etc"
    chmod 1777 "$work/root/tmp"
    dpkg-deb -x "$work"/*.deb "$work/root"
    rm -rf "$work/root/usr/share/doc" "$work/root/usr/share/man"
    echo 'root:x:0:0:root:/:/bin/sh' > "$work/root/etc/passwd"
    echo 'root:x:0:' > "$work/root/etc/group"
    tar -C "$work/root" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
        --numeric-owner --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        -cf "$work/layer.tar" .
    local created entry=()
    created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
    for a in "$@"; do entry+=(--config.entrypoint "$a"); done
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:img"
    umoci raw add-layer --image "$work/oci:img" --history.created "$created" \
      --history.created_by "dpkg-deb -x $package $version" "$work/layer.tar"
    umoci config --image "$work/oci:img" --created "$created" --no-history "${entry[@]}" \
      --config.env PATH=/usr/bin:/bin --config.workingdir /
    umoci gc --layout "$work/oci"
    skopeo copy --quiet "oci:$work/oci:img" "oci-archive:$archive.tmp:$ref"
    mv "$archive.tmp" "$archive"
    rm -rf "$work"; trap - EXIT
    for old in "$cache"/lab-"$name"-*.oci.tar; do [ "$old" = "$archive" ] || rm -f -- "$old"; done
  fi
  echo "$archive $ref"
}

pause() { build pause catatonit /usr/bin/catatonit -P; }
testpod() { build testpod busybox-static /bin/busybox; }
case "${1:-}" in
  --print-pause) pause ;;
  --print-testpod) testpod ;;
  "") pause; testpod ;;
  *) echo "usage: $0 [--print-pause|--print-testpod]" >&2; exit 2 ;;
esac
