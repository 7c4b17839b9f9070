#!/usr/bin/env bash
# Before/after of one change, run by hand: the keyspaces-proxy of git revision BASE and the one of
# the working tree, side by side against one emulator (TLS, one runtime thread), rounds
# interleaved. Reports medians of throughput at saturation and of the proxy's CPU per request,
# at saturation and at a fixed rate (the same traffic through both), and their ratios.
#   BASE=2d34626 ROUNDS=5 DURATION=4 bash benches/ab.sh
. "$(dirname "$0")/lib.sh"
base=${BASE:?set BASE to the git revision to compare against}
rounds=${ROUNDS:-5}
duration=${DURATION:-4}
level=${LEVEL:-4x128}
rate=${FIXED_RATE:-150000}

# The base build gets its own target directory (its dependency features may differ); keep it
# between runs with BASE_TARGET_DIR.
base_target=${BASE_TARGET_DIR:-$work/base-target}
git worktree add -q --detach "$work/base" "$base"
trap 'git worktree remove --force "$work/base" 2>/dev/null || true; cleanup' EXIT
(cd "$work/base" && cargo build --release --locked -q -p keyspaces-proxy --target-dir "$base_target")
declare -A proxy_bin=([base]="$base_target/release/keyspaces-proxy" [head]="$bin/keyspaces-proxy")

$bin/keyspaces-emulator --listen 127.0.0.1:0 --state-dir "$work/emu" --no-peer-listeners --rate-limit 0 \
  --worker-threads 1 --credential AKIDBENCH:bench-secret > "$work/emu.json" 2>/dev/null &
pids+=($!)
until [ -s "$work/emu.json" ]; do sleep 0.1; done
emu=$(listen_of "$work/emu.json")

declare -A pid_of port_of
for v in base head; do
  port=$(free_port); metrics=$(free_port)
  ${proxy_bin[$v]} --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" --region us-east-1 \
    --endpoint "$emu" --ca-file "$work/emu/ca.pem" --tls-server-name cassandra.us-east-1.amazonaws.com \
    --max-rate-per-connection 0 >/dev/null 2>"$work/proxy-$v.log" &
  pid_of[$v]=$!
  pids+=($!)
  wait_port "$port" "${pid_of[$v]}"
  port_of[$v]=$port
done

results="$work/ab.jsonl"
run() { # $1 base|head, $2 label, rest: load args; the load tool measures the proxy's CPU itself
  local v=$1 label=$2; shift 2
  $bin/keyspaces-load --target "127.0.0.1:${port_of[$v]}" --workload read --duration "$duration" \
    --watch-pid "${pid_of[$v]}" "$@" > "$work/report.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r.update(version=sys.argv[2], label=sys.argv[3]); print(json.dumps(r))' \
    "$work/report.json" "$v" "$label" >> "$results"
}
for r in $(seq "$rounds"); do
  for v in base head; do
    run "$v" saturation --connections "${level%x*}" --concurrency "${level#*x}"
    run "$v" fixed-rate --connections 4 --concurrency 64 --rate "$rate"
  done
  echo "round $r done" >&2
done
python3 - "$results" "$base" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(v, label, f):
    return statistics.median(f(r) for r in rows if r["version"] == v and r["label"] == label)
rate = lambda r: r["throughput_rps"]
cpu = lambda r: r["process"]["cpu_us_per_request"]
print(f"base = {sys.argv[2]}, head = working tree; medians of {len(rows) // 4} interleaved rounds")
print("| | base | head | head / base |")
print("|---|---|---|---|")
for name, label, f in [("req/s at saturation", "saturation", rate),
                       ("proxy CPU µs/request at saturation", "saturation", cpu),
                       ("proxy CPU µs/request at the fixed rate", "fixed-rate", cpu)]:
    b, h = med("base", label, f), med("head", label, f)
    print(f"| {name} | {b:,.2f} | {h:,.2f} | {h / b:.3f} |")
PY
