#!/usr/bin/env bash
# Install the Debian packages vpblu needs and the kernel-header links bcc needs.
# Idempotent: when everything is there it only checks, in well under a second.
set -euo pipefail
pkgs=(wireguard-go wireguard-tools python3-bpfcc bpfcc-tools linux-headers-amd64
      iproute2 iptables nftables tcpdump iperf3 iputils-ping openssl procps curl)
# Building the image without a Docker daemon (scripts/build-image.sh) and
# loading it into podman and containerd (tests/integration/test_image.py).
pkgs+=(mmdebstrap umoci skopeo podman containerd runc)
# Real kubelet nodes in the local cluster (issue 22): each node's containerd runs
# pods through runc with a bridge/host-local CNI.
pkgs+=(containernetworking-plugins)
# promtool checks the /metrics exposition of controller and daemon (issue 18).
pkgs+=(prometheus)
# The dashboard's browser tests (issue 21): headless Chromium driven by Selenium.
pkgs+=(chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. Debian's headers
# are for its own kernel, not necessarily the running one; for tc classifiers
# the two folders of the installed headers are enough. The folder names move
# with Debian's kernel ABI, so they are found by glob.
mods="/lib/modules/$(uname -r)"
if [ ! -e "$mods/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || { echo "kernel headers not found under /usr/src" >&2; exit 1; }
  mkdir -p "$mods"
  ln -sfn "$arch_dir" "$mods/build"
  ln -sfn "$common_dir" "$mods/source"
fi
# bpffs for pinned maps.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
