#!/usr/bin/env bash
# Compares corelay with Janus (its VideoRoom plugin) under one identical load.
#
#   loadtest/compare-janus.sh [harness scenario flags]
#       default flags: --preset meeting --rooms 4 --duration 20
#   loadtest/compare-janus.sh --janus-only [COMMAND...]
#       starts the private Janus and runs COMMAND in its namespace with JANUS_URL
#       set, exiting with its status; without one, waits (for janus.rs's live test)
#
# Each server runs alone, pinned to core 0; the harness (corelay-loadtest) runs on
# core 1 with the same scenario against each in turn and reads the server's CPU from
# /proc (--server-pid). Janus is Debian's package (installed when missing; needs
# root), run with a private configuration (loadtest/janus/, written to a temp dir):
# VideoRoom and WebSocket only, ICE-lite, no STUN, no 1:1 NAT. Janus offers no
# loopback candidates and ICE with a loopback client fails, so everything runs in a
# network namespace this script makes (and removes), on a veth interface of its own:
# no packet of the comparison can leave the machine. Prints one table of both
# servers' figures and their ratio, each server's CPU per packet also over the floor
# (AES-GCM + sendmmsg) measured on core 0 in its run; the harness's tables and JSON
# and the servers' logs stay in target/compare-janus/.
#
# Environment: JANUS_PORT (8188), COMPARE_OUT (target/compare-janus).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${COMPARE_OUT:-$root/target/compare-janus}
janus_port=${JANUS_PORT:-8188}
# The namespace's own address (on its veth interface), for both servers and the harness.
ns_ip=10.77.0.1
if (($# == 0)); then
  set -- --preset meeting --rooms 4 --duration 20
fi

# Installs the Debian packages of missing commands (`command:package`).
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  ((${#missing[@]} == 0)) && return
  if [[ $(id -u) != 0 ]]; then
    echo "compare-janus: needs ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

if [[ -z ${CORELAY_COMPARE_NETNS:-} ]]; then
  # Outside the namespace: install and build (both need the network), then run this
  # script again inside a fresh namespace.
  need janus:janus jq:jq ip:iproute2
  if [[ $1 != --janus-only ]]; then
    cargo build --release -p corelay -p corelay-loadtest
  fi
  ns=corelay-compare-$$
  ip netns add "$ns"
  trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
  ip -n "$ns" link set lo up
  # A veth pair with both ends inside: a non-loopback interface for Janus's ICE.
  ip -n "$ns" link add cmp0 type veth peer name cmp1
  ip -n "$ns" addr add "$ns_ip/24" dev cmp0
  ip -n "$ns" link set cmp0 up
  ip -n "$ns" link set cmp1 up
  CORELAY_COMPARE_NETNS=$ns ip netns exec "$ns" "$root/loadtest/compare-janus.sh" "$@"
  exit
fi
host_ip=$ns_ip

mkdir -p "$out"
tmp=$(mktemp -d)
server_pid=
cleanup() {
  stop_server
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_server() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}

listening() { (exec 3<>"/dev/tcp/$host_ip/$1") 2>/dev/null; }

start_janus() {
  local lib dir=$tmp/janus f
  if listening "$janus_port"; then
    echo "compare-janus: $host_ip:$janus_port is taken; set JANUS_PORT" >&2
    exit 1
  fi
  lib=$(dirname "$(dirname "$(find /usr/lib /usr/local/lib /opt/janus/lib -path '*/janus/plugins/libjanus_videoroom.so' 2>/dev/null | head -1)")")
  mkdir -p "$dir/plugins" "$dir/transports" "$dir/none"
  ln -s "$lib/plugins/libjanus_videoroom.so" "$dir/plugins/"
  ln -s "$lib/transports/libjanus_websockets.so" "$dir/transports/"
  for f in loadtest/janus/*.jcfg; do
    sed -e "s|@DIR@|$dir|g" -e "s|@ICE_IP@|$host_ip|g" -e "s|@WS_PORT@|$janus_port|g" \
      "$f" >"$dir/$(basename "$f")"
  done
  taskset -c 0 janus -F "$dir" -C "$dir/janus.jcfg" -o >"$out/janus.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    listening "$janus_port" && port=$janus_port && return
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "compare-janus: Janus did not start; see $out/janus.log" >&2
  exit 1
}

start_corelay() {
  taskset -c 0 target/release/corelay --port 0 --bind "$host_ip" --public-ip "$host_ip" \
    --udp-port-base 0 --shards 1 --log-level warn >"$out/corelay.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    port=$(sed -n 's|^listening http://.*:\([0-9]*\)$|\1|p' "$out/corelay.log" | head -1)
    [[ -n $port ]] && return
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "compare-janus: corelay did not start; see $out/corelay.log" >&2
  exit 1
}

if [[ $1 == --janus-only ]]; then
  shift
  start_janus
  if (($# > 0)); then
    JANUS_URL=ws://$host_ip:$port "$@"
    exit
  fi
  echo "Janus (pid $server_pid) on ws://$host_ip:$port in network namespace $CORELAY_COMPARE_NETNS; Ctrl-C stops it. Its live test:"
  echo "  JANUS_URL=ws://$host_ip:$port ip netns exec $CORELAY_COMPARE_NETNS cargo test --offline --release --workspace --lib janus -- --ignored"
  wait "$server_pid"
  exit
fi

harness=target/release/corelay-loadtest
if ! "$harness" --help | grep -q -- --target; then
  echo "compare-janus: $harness has no --target option yet" >&2
  exit 1
fi

for server in corelay janus; do
  "start_$server"
  echo "== $server (pid $server_pid, core 0) on ws://$host_ip:$port; harness on core 1: $*" >&2
  taskset -c 1 "$harness" --url "ws://$host_ip:$port" --target "$server" \
    --server-pid "$server_pid" --json "$out/$server.json" "$@" >"$out/$server.txt"
  stop_server
done

# CPU per forwarded packet is computed the same way for both: server CPU over the
# packets the harness received (Janus has no forwarded-packet counter). Each run
# measures its floor on core 0 once the server is idle; the ratio to it holds across
# hosts.
jq -n -r --slurpfile c "$out/corelay.json" --slurpfile j "$out/janus.json" '
  def per_packet: if .server.cpu_pct != null and .rates.rx_pps > 0
                  then .server.cpu_pct * 10000 / .rates.rx_pps else null end;
  def rows: [
    ["server CPU, % of one core", .server.cpu_pct],
    ["server CPU per forwarded packet, us", per_packet],
    ["floor per packet (AES-GCM + sendmmsg), us", .server.floor.us_per_packet],
    ["server CPU per packet / floor",
      (if per_packet != null and .server.floor != null
       then per_packet / .server.floor.us_per_packet else null end)],
    ["forwarded packets/s (harness received)", .rates.rx_pps],
    ["loss end to end, %", .loss.measured.loss_pct],
    ["loss server to subscriber, %", .loss.counted.loss_pct],
    ["latency p50, ms", .latency_ms.p50],
    ["latency p99, ms", .latency_ms.p99],
    ["join time p50, ms", .join_ms.p50],
    ["join time p99, ms", .join_ms.p99],
    ["connect to joined p50, ms", .connect_ms.p50],
    ["connect to joined p99, ms", .connect_ms.p99],
    ["first video p50, ms", .first_video_ms.p50],
    ["first keyframe p50, ms (measuring)", .first_keyframe_ms.p50],
    ["server memory, MB", .server.rss_mb],
    ["joins", .peers.joins],
    ["failed joins", ([.peers.join_failures[]] | add // 0)],
    ["violations", .peers.violations]
  ];
  def fmt: if . == null then "n/a" elif . == floor then tostring
           else (. * 1000 | round / 1000 | tostring) end;
  ($c[0] | rows) as $a | ($j[0] | rows) as $b
  | (["", "corelay", "janus", "janus/corelay"] | @tsv),
    (range(0; $a | length) as $i
     | [$a[$i][0], ($a[$i][1] | fmt), ($b[$i][1] | fmt),
        (if ($a[$i][1] | type) == "number" and ($b[$i][1] | type) == "number"
            and $a[$i][1] != 0
         then ($b[$i][1] / $a[$i][1] * 100 | round / 100 | tostring) + "x"
         else "" end)] | @tsv),
    ($c[0].warnings[] | "corelay run: " + .),
    ($j[0].warnings[] | "janus run: " + .)
' | awk -F'\t' 'NF > 1 { printf "%-42s %12s %12s %14s\n", $1, $2, $3, $4; next } { print }'
echo "(reports, JSON and server logs: $out)"
