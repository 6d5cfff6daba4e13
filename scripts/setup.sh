#!/usr/bin/env bash
# Installs what Kiln needs beyond the Rust toolchain, into this checkout's .kiln/tools:
# the pinned Deno (tool sandbox). Safe to run again: it only installs what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install-deno.sh"
"$root/scripts/install-mcp-clients.sh"
