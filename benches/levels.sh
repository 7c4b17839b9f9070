#!/usr/bin/env bash
# Throughput and CPU per request at every load level, run by hand: the emulator directly,
# through haproxy in TCP mode and through keyspaces-proxy, prepared reads, one emulator thread,
# no rate limit. Levels are client connections × requests in flight each, from one busy client
# to many clients with little in flight (the common application shape). CPU per request is the
# middlebox's own (user + system, from /proc) over the requests it carried; FIXED_RATE runs
# the same traffic through both middleboxes for CPU on equal work.
#   UPSTREAM=plain|tls ROUNDS=3 DURATION=3 bash benches/levels.sh
. "$(dirname "$0")/lib.sh"
rounds=${ROUNDS:-3}
duration=${DURATION:-3}
upstream=${UPSTREAM:-plain}
levels=${LEVELS:-1x64 2x64 4x64 8x64 32x8 128x2}
out=${OUT:-benches/results}
mkdir -p "$out"
command -v haproxy >/dev/null || { echo "haproxy is needed: apt-get install haproxy" >&2; exit 1; }
name=cassandra.us-east-1.amazonaws.com
emu_extra=()
[ "$upstream" = plain ] && emu_extra=(--insecure-plaintext-for-benchmarks)
$bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners --peers 0 --rate-limit 0 \
  --worker-threads 1 --credential AKIDBENCH:bench-secret "${emu_extra[@]+"${emu_extra[@]}"}" > "$work/emu.json" 2>/dev/null &
pids+=($!); emu_pid=$!
until [ -s "$work/emu.json" ]; do sleep 0.1; done
emu=$(listen_of "$work/emu.json")

port=$(free_port)
if [ "$upstream" = plain ]; then
  up=(--endpoint "$emu" --insecure-plaintext-upstream-for-benchmarks)
  server="server e $emu"
  direct=(--target "$emu" --sigv4-plaintext --credential AKIDBENCH:bench-secret)
else
  up=(--endpoint "$emu" --ca-file "$work/emu/ca.pem" --tls-server-name "$name")
  server="server e $emu ssl verify required ca-file $work/emu/ca.pem sni str($name) verifyhost $name"
  direct=(--target "$emu" --tls-ca "$work/emu/ca.pem" --credential AKIDBENCH:bench-secret)
fi
# The load tool opens every connection at once from one address: past the default share of
# handshake slots per source (64) some would be closed and 128×2 measured with fewer clients.
$bin/keyspaces-proxy --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" --region us-east-1 \
  "${up[@]}" --max-rate-per-connection 0 --max-connections 20000 --max-handshaking-per-source 1024 ${PROXY_ARGS:-} >/dev/null 2>"$work/proxy.log" &
pids+=($!); proxy_pid=$!
wait_port "$port" "$proxy_pid"
proxy_port=$port
port=$(free_port)
haproxy_tcp_config "$port" "$server" > "$work/haproxy.cfg"
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=($!); haproxy_pid=$!
wait_port "$port" "$haproxy_pid"
haproxy_port=$port
sleep 1

declare -A target_of=([direct]="${direct[*]}" [haproxy]="--target 127.0.0.1:$haproxy_port --sigv4-plaintext --credential AKIDBENCH:bench-secret" [proxy]="--target 127.0.0.1:$proxy_port")
declare -A pid_of=([direct]="" [haproxy]=$haproxy_pid [proxy]=$proxy_pid)
cpu_ticks() { [ -n "$1" ] && awk '{print $14+$15}' "/proc/$1/stat" || echo 0; }
hz=$(getconf CLK_TCK)
results="$out/levels-$upstream.jsonl"
: > "$results"
run() { # $1 path, $2 label, rest: load args
  local path=$1 label=$2 before report; shift 2
  before=$(cpu_ticks "${pid_of[$path]}")
  # shellcheck disable=SC2086
  report=$($bin/keyspaces-load ${target_of[$path]} --workload read --duration "$duration" "$@")
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(path=sys.argv[2], label=sys.argv[3], cpu_s=int(sys.argv[4])/int(sys.argv[5])); print(json.dumps(r))' \
    "$report" "$path" "$label" "$(( $(cpu_ticks "${pid_of[$path]}") - before ))" "$hz" >> "$results"
}
for r in $(seq "$rounds"); do
  for level in $levels; do
    for p in direct haproxy proxy; do run "$p" "$level" --connections "${level%x*}" --concurrency "${level#*x}"; done
  done
  for p in haproxy proxy; do run "$p" fixed --connections 4 --concurrency 64 --rate "${FIXED_RATE:-80000}"; done
  echo "round $r done" >&2
done
python3 - "$results" "$out/levels-$upstream.md" "$levels" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(p, label, f):
    v = [f(r) for r in rows if r["path"] == p and r["label"] == label]
    return statistics.median(v) if v else float("nan")
rps = lambda r: r["throughput_rps"]
cpu_us = lambda r: r["cpu_s"] * 1e6 / max(r["requests"], 1)
lines = ["| level | direct req/s | haproxy req/s | proxy req/s | proxy/direct | haproxy/direct | proxy CPU µs/req | haproxy CPU µs/req |",
         "|---|---|---|---|---|---|---|---|"]
for level in sys.argv[3].split() + ["fixed"]:
    d, h, p = (med(x, level, rps) for x in ("direct", "haproxy", "proxy"))
    lines.append(f"| {level} | {d:,.0f} | {h:,.0f} | {p:,.0f} | {p / d:.2f}× | {h / d:.2f}× | {med('proxy', level, cpu_us):.2f} | {med('haproxy', level, cpu_us):.2f} |")
text = "\n".join(lines)
print(text)
open(sys.argv[2], "w").write(text + "\n")
PY
