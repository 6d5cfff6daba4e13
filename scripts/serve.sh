#!/usr/bin/env bash
# One command to run Kiln: installs what it needs, builds it, and starts `kiln serve` on the
# embedded SQLite store (./.kiln/kiln.db), listening on 127.0.0.1:8788. Extra arguments are
# passed to `kiln serve` (e.g. --listen 127.0.0.1:9000, --database-url postgres://...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
exec cargo run --release --locked --bin kiln -- serve "$@"
