#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600) with libFuzzer on the stable toolchain
# (no sanitizer: `-s none`), keeping the corpus small in fuzz/corpus/<target>.
#   cargo install cargo-fuzz --locked && bash fuzz/run.sh 600 [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decoder client_handshake upstream_frames result_rewriter plain_credentials kmsauth_token request_validator validator_vs_emulator)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t for ${seconds}s"
  cargo fuzz run "$t" -s none "fuzz/corpus/$t" -- -max_total_time="$seconds" -max_len=4096 2>&1 | tail -3
  # Keep the checked-in corpus minimal.
  cargo fuzz cmin "$t" -s none "fuzz/corpus/$t" >/dev/null 2>&1 || true
done
