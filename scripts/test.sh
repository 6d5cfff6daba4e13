#!/usr/bin/env bash
# One command to run the whole test suite: installs what the tests need, makes sure the local
# PostgreSQL is up, and runs every test of every crate once (cargo-nextest). Fails if no test ran.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
"$root/scripts/ensure-postgres.sh"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
export KILN_TEST_PG_URL="${KILN_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
exec cargo nextest run --workspace --locked --no-fail-fast --no-tests=fail "$@"
