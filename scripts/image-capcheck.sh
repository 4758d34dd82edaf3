#!/usr/bin/env bash
# Which capabilities does the daemon need? Runs the image's daemon (make image)
# under podman with only CAPS (default NET_ADMIN,BPF,PERFMON; seccomp
# unconfined, /dev/net/tun, the DaemonSet's host mounts) in a throwaway
# network namespace with a pod veth and an underlay, without a controller,
# for 15 s; then shows what it made (the wireguard-go interface, the
# classifier on the pod veth, the underlay guard, the rules) and tries the
# one /proc/sys write the daemon makes (the mesh interface's rp_filter).
# The findings are in kustomize/base/daemon.yaml. Root; leaves nothing behind.
#   scripts/image-capcheck.sh [CAPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
caps=${1:-NET_ADMIN,BPF,PERFMON}
archive=$(bash "$root/scripts/build-image.sh" --print-path)
[ -f "$archive" ] || { echo "no image: run make image" >&2; exit 1; }
version=$(basename "$(readlink -f "$archive")" | cut -d- -f2)
image=docker.io/library/vpblu:$version
ns=vpblu-capcheck-$$
work=$(mktemp -d /tmp/vpblu-capcheck.XXXXXX)
pm=(podman --root "$work/root" --runroot "$work/run")
cleanup() {
  "${pm[@]}" rm -af >/dev/null 2>&1 || true
  "${pm[@]}" rmi -af >/dev/null 2>&1 || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/sys/fs/bpf/$ns" "$work"
}
trap cleanup EXIT
"${pm[@]}" load -q -i "$archive" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/ca.key" \
  -out "$work/ca.crt" -days 1 -subj /CN=capcheck 2>/dev/null
echo token > "$work/token"
mkdir -p "$work/state"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add veth-pod0 type veth peer name pod0
ip -n "$ns" link add ul0 type veth peer name ul1
ip -n "$ns" addr add 10.250.0.1/24 dev ul0
for l in veth-pod0 pod0 ul0 ul1; do ip -n "$ns" link set "$l" up; done
ip -n "$ns" route add default via 10.250.0.2 dev ul0
# podman's default nofile/nproc are refused without CAP_SYS_RESOURCE on some hosts.
run=("${pm[@]}" run --rm --network "ns:/run/netns/$ns" --ulimit nofile=4096:4096
     --ulimit nproc=4096:4096 --cap-drop=all --cap-add="$caps"
     --security-opt seccomp=unconfined --device /dev/net/tun
     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro -v /sys/fs/bpf:/sys/fs/bpf
     -v "$work/state:/var/lib/vpblu" -v "$work/ca.crt:/etc/vpblu/ca.crt:ro"
     -v "$work/token:/token:ro")
echo "daemon with $caps for 15 s..."
timeout 40 "${run[@]}" --name "$ns" "$image" daemon run --node-name capcheck \
  --controller 127.0.0.1:9 --ca /etc/vpblu/ca.crt --token-file /token \
  --bpf-pin-dir "/sys/fs/bpf/$ns" --interface wgcap0 --underlay-interface ul0 \
  >"$work/daemon.log" 2>&1 &
sleep 15
# (wireguard-go runs in the container: it ends with it, so look before stopping.)
echo "--- wireguard-go interface:"; ip -n "$ns" -br link show wgcap0 || echo "MISSING"
echo "--- classifier on the pod veth:"
tc -n "$ns" filter show dev veth-pod0 ingress | grep -o 'vpblu-classify.*jited' || echo "MISSING"
echo "--- guard on the underlay:"
tc -n "$ns" filter show dev ul0 egress | grep -o 'vpblu-guard.*jited' || echo "MISSING"
echo "--- rules:"; ip -n "$ns" rule | grep -Ev "^(0|32766|32767):" || true
"${pm[@]}" stop -t 10 "$ns" >/dev/null 2>&1 || true
wait || true
echo "--- errors in the daemon's log:"
grep -E "ERROR|Error|rror:" "$work/daemon.log" | grep -v "mesh stream" | sort | uniq -c | head || true
echo "--- /proc/sys write (the mesh interface's rp_filter):"
"${run[@]}" --entrypoint sh "$image" -c \
  'echo 2 > /proc/sys/net/ipv4/conf/ul0/rp_filter && echo writable' 2>&1 | tail -1
