#!/usr/bin/env bash
# Latency and throughput of the TLS path against two server behaviours, run by hand:
#   fast — the emulator as it is (answers batched, a few µs each);
#   slow — the emulator made unlike itself: 400 µs per request, every answer written as two TLS
#          records (header, then body), as an independent server measured in issue 19 does.
# For each: the emulator directly, through haproxy in TCP mode (TLS to the emulator, the L4
# floor) and through keyspaces-proxy (TLS + SigV4 upstream). Sequential requests with the load
# tool and with the real Python driver (prepared reads), and throughput at saturation. Rounds
# are interleaved; medians are printed and written to benches/results/latency.md.
#   ROUNDS=5 DURATION=3 TLS_VERSIONS=both bash benches/latency.sh
. "$(dirname "$0")/lib.sh"
rounds=${ROUNDS:-5}
duration=${DURATION:-3}
out=${OUT:-benches/results}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
command -v haproxy >/dev/null || { echo "haproxy is needed: apt-get install haproxy" >&2; exit 1; }
name=cassandra.us-east-1.amazonaws.com


declare -A emu_of proxy_of haproxy_of pid_of
for behaviour in fast slow; do
  extra=()
  [ "$behaviour" = slow ] && extra=(--latency-us 400 --split-answers)
  $bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners --peers 0 \
    --rate-limit 0 --worker-threads 1 --tls-versions "${TLS_VERSIONS:-both}" \
    --credential AKIDBENCH:bench-secret "${extra[@]+"${extra[@]}"}" > "$work/emu-$behaviour.json" 2>/dev/null &
  pids+=($!); pid_of[emu_$behaviour]=$!
  until [ -s "$work/emu-$behaviour.json" ]; do sleep 0.1; done
  emu_of[$behaviour]=$(listen_of "$work/emu-$behaviour.json")

  port=$(free_port)
  $bin/keyspaces-proxy --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" --region us-east-1 \
    --endpoint "${emu_of[$behaviour]}" --ca-file "$work/emu/ca.pem" --tls-server-name "$name" \
    --max-rate-per-connection 0 --max-connections 20000 ${PROXY_ARGS:-} >/dev/null 2>"$work/proxy-$behaviour.log" &
  pids+=($!); pid_of[proxy_$behaviour]=$!
  wait_port "$port" "$!"
  proxy_of[$behaviour]=$port

  port=$(free_port)
  haproxy_tcp_config "$port" "server e ${emu_of[$behaviour]} ssl verify required ca-file $work/emu/ca.pem sni str($name) verifyhost $name" > "$work/haproxy-$behaviour.cfg"
  haproxy -db -f "$work/haproxy-$behaviour.cfg" >"$work/haproxy-$behaviour.log" 2>&1 &
  pids+=($!); pid_of[haproxy_$behaviour]=$!
  wait_port "$port" "$!"
  haproxy_of[$behaviour]=$port
done
sleep 1

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results="$out/latency.jsonl"
: > "$results"
record() { # $1 behaviour, $2 path, $3 label, $4 json, $5 cpu ticks of the middlebox
  python3 -c 'import json,sys; r=json.loads(sys.argv[4]); r.update(behaviour=sys.argv[1], path=sys.argv[2], label=sys.argv[3], cpu_s=int(sys.argv[5])/int(sys.argv[6])); print(json.dumps(r))' \
    "$1" "$2" "$3" "$4" "$5" "$hz" >> "$results"
}
run() { # $1 behaviour, $2 path
  local b=$1 path=$2 load driver under before
  case $path in
    direct) load=(--target "${emu_of[$b]}" --tls-ca "$work/emu/ca.pem" --credential AKIDBENCH:bench-secret)
            driver=(--port "${emu_of[$b]##*:}" --ca "$work/emu/ca.pem" --sigv4 AKIDBENCH:bench-secret) ;;
    haproxy) load=(--target "127.0.0.1:${haproxy_of[$b]}" --sigv4-plaintext --credential AKIDBENCH:bench-secret)
             driver=(--port "${haproxy_of[$b]}" --sigv4 AKIDBENCH:bench-secret) ;;
    proxy) load=(--target "127.0.0.1:${proxy_of[$b]}"); driver=(--port "${proxy_of[$b]}") ;;
  esac
  under=${pid_of[${path}_$b]:-}
  ticks() { [ -n "$under" ] && cpu_ticks "$under" || echo 0; }
  before=$(ticks)
  record "$b" "$path" sequential "$($bin/keyspaces-load "${load[@]}" --workload read --duration "$duration" --connections 1 --concurrency 1)" $(( $(ticks) - before ))
  before=$(ticks)
  record "$b" "$path" driver "$($python benches/driver_latency.py "${driver[@]}" --requests "${DRIVER_REQUESTS:-2000}")" $(( $(ticks) - before ))
  for level in ${SATURATION_LEVELS:-4x64 8x64}; do
    before=$(ticks)
    record "$b" "$path" "saturation-$level" "$($bin/keyspaces-load "${load[@]}" --workload read --duration "$duration" \
      --connections "${level%x*}" --concurrency "${level#*x}")" $(( $(ticks) - before ))
  done
}
for r in $(seq "$rounds"); do
  for b in fast slow; do
    for p in direct haproxy proxy; do run "$b" "$p"; done
  done
  echo "round $r done" >&2
done
python3 - "$results" "$out/latency.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(b, p, label, f):
    v = [f(r) for r in rows if r["behaviour"] == b and r["path"] == p and r["label"] == label]
    return statistics.median(v) if v else float("nan")
lines = ["| server | path | seq p50 µs (load tool) | added | driver p50 µs | added | best saturation req/s | vs direct |",
         "|---|---|---|---|---|---|---|---|"]
for b in ("fast", "slow"):
    sat = lambda p: max(med(b, p, l, lambda r: r["throughput_rps"]) for l in {r["label"] for r in rows if r["label"].startswith("saturation")})
    base_seq = med(b, "direct", "sequential", lambda r: r["latency_us"]["p50"])
    base_drv = med(b, "direct", "driver", lambda r: r["p50_us"])
    for p in ("direct", "haproxy", "proxy"):
        seq = med(b, p, "sequential", lambda r: r["latency_us"]["p50"])
        drv = med(b, p, "driver", lambda r: r["p50_us"])
        lines.append(f"| {b} | {p} | {seq:.0f} | {seq - base_seq:+.0f} | {drv:.0f} | {drv - base_drv:+.0f} | {sat(p):,.0f} | {sat(p) / sat('direct'):.2f}× |")
text = "\n".join(lines)
print(text)
open(sys.argv[2], "w").write(text + "\n")
PY
