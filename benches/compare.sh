#!/usr/bin/env bash
# Side-by-side comparison, run by hand (not part of CI's pass/fail):
#   the emulator directly · through keyspaces-proxy · through haproxy in TCP mode (the L4 floor),
# each with TLS to the emulator, and again with a plaintext upstream (benchmark-only flags,
# loopback only). Rounds are interleaved; medians and ratios are printed and written to
# benches/results/. Needs haproxy (Debian: apt-get install haproxy).
#   ROUNDS=5 DURATION=5 bash benches/compare.sh
. "$(dirname "$0")/lib.sh"
rounds=${ROUNDS:-5}
duration=${DURATION:-5}
out=${OUT:-benches/results}
mkdir -p "$out"

command -v haproxy >/dev/null || { echo "haproxy is needed: apt-get install haproxy" >&2; exit 1; }

name=cassandra.us-east-1.amazonaws.com

declare -A emu_pid
start_emulator() { # $1 = tls|plain
  local extra=()
  [ "$1" = plain ] && extra=(--insecure-plaintext-for-benchmarks)
  # One runtime thread: the emulator's engine runs every statement under one lock, and a second
  # thread only spun on it (13% of the emulator's profile; 3.4 → 2.2 µs of CPU per request with
  # one thread) and made runs noisy. EMULATOR_THREADS=0 gives one per core.
  $bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners --rate-limit 0 \
    --worker-threads "${EMULATOR_THREADS:-1}" \
    --credential AKIDBENCH:bench-secret ${extra[@]+"${extra[@]}"} > "$work/emu-$1.json" 2>/dev/null &
  pids+=($!)
  emu_pid[$1]=$!
  until [ -s "$work/emu-$1.json" ]; do sleep 0.1; done
}
start_emulator tls
start_emulator plain
emu_tls=$(listen_of "$work/emu-tls.json")
emu_plain=$(listen_of "$work/emu-plain.json")
ca="$work/emu/ca.pem"

declare -A pid_of
declare -A port_of
start_proxy() { # $1 = tls|plain; sets port_of[proxy_$1] and pid_of[proxy_$1]
  local port metrics extra=()
  port=$(free_port); metrics=$(free_port)
  if [ "$1" = tls ]; then
    extra=(--endpoint "$emu_tls" --ca-file "$ca" --tls-server-name "$name")
  else
    extra=(--endpoint "$emu_plain" --insecure-plaintext-upstream-for-benchmarks)
  fi
  $bin/keyspaces-proxy --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" --region us-east-1 \
    --max-rate-per-connection 0 --max-connections 20000 "${extra[@]}" ${PROXY_ARGS:-} >/dev/null 2>"$work/proxy-$1.log" &
  pid_of[proxy_$1]=$!
  pids+=($!)
  wait_port "$port" "${pid_of[proxy_$1]}"
  port_of[proxy_$1]=$port
}
start_haproxy() { # $1 = tls|plain; sets port_of[haproxy_$1] and pid_of[haproxy_$1]
  local port server
  port=$(free_port)
  if [ "$1" = tls ]; then
    server="server e $emu_tls ssl verify required ca-file $ca sni str($name) verifyhost $name"
  else
    server="server e $emu_plain"
  fi
  haproxy_tcp_config "$port" "$server" > "$work/haproxy-$1.cfg"
  haproxy -db -f "$work/haproxy-$1.cfg" >"$work/haproxy-$1.log" 2>&1 &
  pid_of[haproxy_$1]=$!
  pids+=($!)
  wait_port "$port" "${pid_of[haproxy_$1]}"
  port_of[haproxy_$1]=$port
}
start_proxy tls; start_proxy plain; start_haproxy tls; start_haproxy plain
proxy_tls=${port_of[proxy_tls]}; proxy_plain=${port_of[proxy_plain]}
haproxy_tls=${port_of[haproxy_tls]}; haproxy_plain=${port_of[haproxy_plain]}
sleep 1

cpu_ticks() { [ -n "${1:-}" ] && awk '{print $14+$15}' "/proc/$1/stat" || echo 0; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
declare -A args_of=(
  [direct_tls]="--target $emu_tls --tls-ca $ca --credential AKIDBENCH:bench-secret"
  [haproxy_tls]="--target 127.0.0.1:$haproxy_tls --sigv4-plaintext --credential AKIDBENCH:bench-secret"
  [proxy_tls]="--target 127.0.0.1:$proxy_tls"
  [direct_plain]="--target $emu_plain --sigv4-plaintext --credential AKIDBENCH:bench-secret"
  [haproxy_plain]="--target 127.0.0.1:$haproxy_plain --sigv4-plaintext --credential AKIDBENCH:bench-secret"
  [proxy_plain]="--target 127.0.0.1:$proxy_plain"
)
results="$out/results.jsonl"
: > "$results"
hz=$(getconf CLK_TCK)
run() { # $1 path, $2 label, rest: load args
  local path=$1 label=$2; shift 2
  local under=${pid_of[$path]:-} emu=${emu_pid[${path#*_}]} before after emu_before emu_after report
  before=$(cpu_ticks "$under"); emu_before=$(cpu_ticks "$emu")
  # The client's own CPU (user and system seconds), from bash's `time`.
  local TIMEFORMAT='%U %S'
  # shellcheck disable=SC2086
  { time $bin/keyspaces-load ${args_of[$path]} --workload read --duration "$duration" "$@" > "$work/report.json"; } 2> "$work/client-cpu"
  report=$(cat "$work/report.json")
  after=$(cpu_ticks "$under"); emu_after=$(cpu_ticks "$emu")
  python3 - "$path" "$label" "$report" "$before" "$after" "$hz" "$emu_before" "$emu_after" "$(tail -1 "$work/client-cpu")" >> "$results" <<'PY'
import json, sys
path, label, report, before, after, hz, emu_before, emu_after, client = sys.argv[1:10]
r = json.loads(report)
user, system = map(float, client.split())
r.update(path=path, label=label, cpu_s=(int(after) - int(before)) / int(hz),
         emulator_cpu_s=(int(emu_after) - int(emu_before)) / int(hz), client_cpu_s=user + system)
print(json.dumps(r))
PY
}
paths=(direct_tls haproxy_tls proxy_tls direct_plain haproxy_plain proxy_plain)
for r in $(seq "$rounds"); do
  for p in "${paths[@]}"; do
    # Saturation is found, not assumed: each path's highest throughput over these levels
    # (a path that adds latency needs more in flight to reach its ceiling).
    for level in ${SATURATION_LEVELS:-4x64 4x128 8x64}; do
      run "$p" "saturation-$level" --connections "${level%x*}" --concurrency "${level#*x}"
    done
    run "$p" sequential --connections 1 --concurrency 1
    # The same traffic through every middlebox, below every path's ceiling: CPU per request
    # compared on equal work (at saturation each path runs at its own rate and batch sizes).
    run "$p" fixed-rate --connections 4 --concurrency 64 --rate "${FIXED_RATE:-150000}"
  done
  echo "round $r done" >&2
done
for c in 1 4 16 64 128; do
  for p in direct_tls haproxy_tls proxy_tls; do run "$p" "sweep-$c" --connections 2 --concurrency "$c"; done
done

# Memory: idle, then holding 10,000 idle client connections.
idle=$(rss_kb "${pid_of[proxy_tls]}")
$bin/keyspaces-load --target "127.0.0.1:$proxy_tls" --hold-connections 10000 --duration 5 > "$work/held.json" &
holder=$!
until [ -s "$work/held.json" ]; do sleep 0.2; done
sleep 1
held=$(rss_kb "${pid_of[proxy_tls]}")
haproxy_rss=$(rss_kb "${pid_of[haproxy_tls]}")
wait $holder || true
python3 - "$idle" "$held" "$haproxy_rss" "$(cat "$work/held.json")" >> "$results" <<'PY'
import json, sys
idle, held, haproxy_rss, h = sys.argv[1:5]
print(json.dumps({"path": "memory", "proxy_idle_rss_kb": int(idle), "proxy_10k_idle_rss_kb": int(held),
                  "haproxy_idle_rss_kb": int(haproxy_rss), "held": json.loads(h)}))
PY
python3 benches/summarize.py "$results" "$out"
