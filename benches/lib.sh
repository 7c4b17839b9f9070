# Shared set-up for the benchmark scripts (sourced): a scratch directory, processes killed on
# exit, a static throwaway AWS identity (the credential chain never probes IMDS or STS), the
# release build, and helpers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

: > "$work/aws-config"
export AWS_EC2_METADATA_DISABLED=true AWS_ACCESS_KEY_ID=AKIDBENCH AWS_SECRET_ACCESS_KEY=bench-secret
export AWS_CONFIG_FILE="$work/aws-config" AWS_SHARED_CREDENTIALS_FILE="$work/aws-config"
unset AWS_PROFILE AWS_SESSION_TOKEN

cargo build --release --locked --workspace -q
bin=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listen_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"])' "$1"; }
wait_port() { # $1 port, $2 pid that must stay alive
  until python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "process $2 died; see $work" >&2; exit 1; }
    sleep 0.1
  done
}
# haproxy in TCP mode on 127.0.0.1:$1 with the backend server line $2 (the L4 baseline).
haproxy_tcp_config() {
  cat <<CFG
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend f
  bind 127.0.0.1:$1
  default_backend b
backend b
  $2
CFG
}
