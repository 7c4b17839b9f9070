#!/usr/bin/env bash
# Pool benchmark (run by hand): side by side in one run, against the emulator with Keyspaces'
# 3,000 req/s per-connection cap on:
#   1. connect→READY time: direct TLS+SigV4 to the emulator vs through the warm proxy;
#   2. one client connection's throughput: direct vs through the proxy.
# Rounds are interleaved; the script prints each run's JSON and the medians.
. "$(dirname "$0")/lib.sh"
rounds=${ROUNDS:-5}
duration=${DURATION:-5}

$bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners \
  --credential AKIDBENCH:bench-secret > "$work/emu.json" 2>/dev/null &
pids+=($!)
until [ -s "$work/emu.json" ]; do sleep 0.1; done
emu=$(listen_of "$work/emu.json")
port=$(free_port)
$bin/keyspaces-proxy --listen "127.0.0.1:$port" --region us-east-1 --endpoint "$emu" \
  --tls-server-name cassandra.us-east-1.amazonaws.com --ca-file "$work/emu/ca.pem" 2>"$work/proxy.log" &
pids+=($!)
until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do sleep 0.1; done
sleep 1 # let the pool warm up

direct=(--target "$emu" --tls-ca "$work/emu/ca.pem" --credential AKIDBENCH:bench-secret)
proxied=(--target "127.0.0.1:$port")
: > "$work/results"
for r in $(seq "$rounds"); do
  for side in direct proxy; do
    if [ $side = direct ]; then args=("${direct[@]}"); else args=("${proxied[@]}"); fi
    c=$($bin/keyspaces-load "${args[@]}" --connect-only 200)
    t=$($bin/keyspaces-load "${args[@]}" --workload read --connections 1 --concurrency 64 --duration "$duration")
    echo "round $r $side connect $c"
    echo "round $r $side throughput $t"
    printf '%s\t%s\t%s\n' "$side" "$c" "$t" >> "$work/results"
  done
done
python3 - "$work/results" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
out = {}
for side, c, t in rows:
    c, t = json.loads(c), json.loads(t)
    d = out.setdefault(side, {"connect_p50_us": [], "rps": [], "errors_per_s": [], "p99_us": []})
    d["connect_p50_us"].append(c["connect_to_ready_us"]["p50"])
    d["rps"].append(t["throughput_rps"])
    d["errors_per_s"].append(t["errors"] / t["duration_s"])
    d["p99_us"].append(t["latency_us"]["p99"])
med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in out.items()}
print(json.dumps(med, indent=1))
dp, pp = med["direct"], med["proxy"]
print(f"connect→READY median: direct TLS+SigV4 {dp['connect_p50_us']:.0f} µs, warm proxy {pp['connect_p50_us']:.0f} µs "
      f"({dp['connect_p50_us'] / max(pp['connect_p50_us'], 1):.1f}× faster through the proxy)")
print(f"one client connection, cap 3,000/s: direct {dp['rps']:.0f} ok/s with {dp['errors_per_s']:.0f} throttled/s; "
      f"proxy {pp['rps']:.0f} ok/s with {pp['errors_per_s']:.0f} errors/s ({pp['rps'] / max(dp['rps'], 1):.1f}×)")
PY
