#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, Rust unit and integration tests, then the
# Python driver / SigV4 plugin / cqlsh tests against the real binaries. Works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# The AWS credential chain must never probe the instance metadata service or STS.
aws_tmp=$(mktemp -d)
trap 'rm -rf "$aws_tmp"' EXIT
: > "$aws_tmp/config"
: > "$aws_tmp/credentials"
export AWS_EC2_METADATA_DISABLED=true
export AWS_ACCESS_KEY_ID=AKIDTESTONLY
export AWS_SECRET_ACCESS_KEY=test-only-secret
export AWS_CONFIG_FILE="$aws_tmp/config"
export AWS_SHARED_CREDENTIALS_FILE="$aws_tmp/credentials"
export AWS_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE AWS_CONTAINER_CREDENTIALS_RELATIVE_URI AWS_CONTAINER_CREDENTIALS_FULL_URI
# The proxy reads KEYSPACES_PROXY_* as settings: the caller's would reach every test's proxy.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^KEYSPACES_PROXY_' || true)

# A whole-suite run rebuilds everything once: incremental caches (~0.7 GB) buy it nothing.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

venv=${KSP_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/integration/requirements.txt

# Every crate in Cargo.lock, other platforms' too: cargo deny reads them all, while a build
# downloads only this platform's, so a fresh machine would otherwise fail offline.
cargo fetch --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Advisories (against the RustSec snapshot in .ci/), licences, bans and sources.
command -v cargo-deny >/dev/null || cargo install cargo-deny --version 0.20.2 --locked
KSP_ADVISORY_DBS=$(bash .ci/advisory-db.sh "$aws_tmp/advisory-dbs") cargo deny --offline check
cargo build --workspace --locked
cargo test --workspace --locked
"$venv/bin/python" -m pytest tests/integration -q -p no:cacheprovider
