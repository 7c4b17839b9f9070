#!/usr/bin/env bash
# Unpacks the committed RustSec advisory-db snapshot where cargo-deny looks for it, as a git
# repository dated like the snapshot (cargo-deny reads HEAD's date). Prints the db-path to use.
#   export KSP_ADVISORY_DBS=$(bash .ci/advisory-db.sh)
# Refresh the snapshot where GitHub is reachable:
#   git clone --depth 1 https://github.com/rustsec/advisory-db /tmp/adb &&
#   git -C /tmp/adb archive --format=tar HEAD | gzip -9n > .ci/advisory-db.tar.gz &&
#   git -C /tmp/adb log -1 --format='%H %cI' > .ci/advisory-db.version
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-$(mktemp -d)}
# cargo-deny names the clone after a hash of its URL (https://github.com/rustsec/advisory-db).
db="$root/advisory-db-3157b0e258782691"
rm -rf "$db"
mkdir -p "$db"
tar -xzf "$here/advisory-db.tar.gz" -C "$db"
read -r _commit date < "$here/advisory-db.version"
(
  cd "$db"
  git init -q
  git add -A
  GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
    git -c user.name=snapshot -c user.email=snapshot@localhost commit -qm "advisory-db snapshot"
)
echo "$root"
