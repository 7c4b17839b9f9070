#!/usr/bin/env bash
# Soak, run by hand (not part of CI): mixed load through keyspaces-proxy (pooled, TLS + SigV4)
# to the emulator with its Keyspaces-like 3,000 req/s per-connection cap on, for DURATION
# seconds, while clients connect and disconnect; then 10,000 idle client connections are held.
# Reports errors per workload, the proxy's RSS drift (mean of minute 2-3 against the last
# minute), CPU, and what holding 10,000 clients costs. Results: benches/results/soak.json.
#   DURATION=1800 bash benches/soak.sh
. "$(dirname "$0")/lib.sh"
duration=${DURATION:-1800}
[ "$duration" -ge 300 ] || { echo "DURATION must be at least 300 s" >&2; exit 2; }
out=${OUT:-benches/results}
mkdir -p "$out"

$bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners \
  --credential AKIDBENCH:bench-secret > "$work/emu.json" 2>/dev/null &
pids+=($!)
until [ -s "$work/emu.json" ]; do sleep 0.1; done
emu=$(listen_of "$work/emu.json")

port=$(free_port); metrics=$(free_port)
$bin/keyspaces-proxy --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" --region us-east-1 \
  --endpoint "$emu" --ca-file "$work/emu/ca.pem" --tls-server-name cassandra.us-east-1.amazonaws.com \
  --max-connections 20000 > /dev/null 2> "$work/proxy.log" &
proxy=$!
pids+=($proxy)
until curl -sf "http://127.0.0.1:$metrics/readyz" > /dev/null; do
  kill -0 $proxy 2>/dev/null || { cat "$work/proxy.log" >&2; exit 1; }
  sleep 0.2
done

load() { $bin/keyspaces-load --target "127.0.0.1:$port" --duration "$((duration + 90))" --warmup 0 "$@"; }
load --workload read --rate 3000 --connections 4 --concurrency 16 > "$work/read.json" &
pids+=($!); read_pid=$!
load --workload write --rate 1500 --connections 2 --concurrency 16 --value-size 512 > "$work/write.json" &
pids+=($!); write_pid=$!
load --workload local --rate 200 --connections 1 --concurrency 4 > "$work/local.json" &
pids+=($!); local_pid=$!
# Connection churn: 50 fresh clients every 5 s.
(
  end=$((SECONDS + duration))
  while [ $SECONDS -lt $end ]; do
    $bin/keyspaces-load --target "127.0.0.1:$port" --connect-only 50 >> "$work/churn.jsonl" || true
    sleep 5
  done
) &
pids+=($!); churn_pid=$!

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$proxy/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$proxy/stat"; }
start=$SECONDS
cpu0=$(cpu_ticks)
: > "$work/rss.csv"
while [ $((SECONDS - start)) -lt "$duration" ]; do
  echo "$((SECONDS - start)),$(rss_kb)" >> "$work/rss.csv"
  sleep 10
done
cpu1=$(cpu_ticks)
wait $churn_pid || true

# 10,000 idle clients on top of the running load.
$bin/keyspaces-load --target "127.0.0.1:$port" --hold-connections 10000 --duration 20 > "$work/held.json" &
holder=$!
until [ -s "$work/held.json" ]; do sleep 0.2; done
sleep 2
held_rss=$(rss_kb)
wait $holder || true
curl -sf "http://127.0.0.1:$metrics/metrics" > "$work/metrics.txt"
wait $read_pid $write_pid $local_pid

python3 - "$work" "$duration" "$held_rss" "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" > "$out/soak.json" <<'PY'
import json, sys, statistics
work, duration, held_rss, ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rss = [tuple(map(int, l.split(","))) for l in open(f"{work}/rss.csv") if l.strip()]
base = statistics.mean(r for t, r in rss if 120 <= t < 180)
last = statistics.mean(r for t, r in rss if t >= duration - 60)
loads = {w: json.load(open(f"{work}/{w}.json")) for w in ("read", "write", "local")}
churn = [json.loads(l) for l in open(f"{work}/churn.jsonl") if l.strip()]
held = json.load(open(f"{work}/held.json"))
upstream_errors = {l.split("{")[1].split("}")[0]: float(l.rsplit(" ", 1)[1])
                   for l in open(f"{work}/metrics.txt") if l.startswith("keyspaces_proxy_upstream_errors_total{")}
requests = sum(l["requests"] for l in loads.values())
print(json.dumps({
    "duration_s": duration,
    "requests": requests,
    "errors": {w: l["errors"] for w, l in loads.items()},
    "failed_connections": {w: l["failed_connections"] for w, l in loads.items()},
    "latency_p99_us": {w: l["latency_us"]["p99"] for w, l in loads.items()},
    "churn_connects": sum(c["connects"] for c in churn),
    "churn_failed": sum(c["failed"] for c in churn),
    "rss_kb": {"minute_2_3": round(base), "last_minute": round(last), "max": max(r for _, r in rss),
               "drift_percent": round((last - base) / base * 100, 2)},
    "proxy_cpu_s": ticks / hz,
    "held_10k": held, "rss_kb_holding_10k": held_rss,
    "upstream_errors": upstream_errors,
}, indent=2))
PY
cat "$out/soak.json"
