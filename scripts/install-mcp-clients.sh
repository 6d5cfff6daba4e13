#!/usr/bin/env bash
# Installs the real MCP clients Kiln's tests drive, pinned, into .kiln/tools:
#   - Python `mcp` (the official Python SDK) in a virtualenv at .kiln/tools/py
#   - Node 22 (npm package `node`) and the MCP conformance suite (`@modelcontextprotocol/conformance`)
#     under .kiln/tools/node
# Idempotent: a stamp file records what is installed; nothing is downloaded when it matches.
set -euo pipefail
MCP_PY_VERSION="2.3.0"
NODE_VERSION="22.21.1"
CONFORMANCE_VERSION="0.1.16"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.kiln/tools"
mkdir -p "$tools"

py="$tools/py"
if [[ "$(cat "$py/.kiln-stamp" 2>/dev/null)" != "mcp==$MCP_PY_VERSION" ]]; then
  echo "installing python mcp $MCP_PY_VERSION into $py" >&2
  rm -rf "$py"
  python3 -m venv "$py"
  "$py/bin/python" -m pip install --quiet --disable-pip-version-check "mcp==$MCP_PY_VERSION"
  echo "mcp==$MCP_PY_VERSION" > "$py/.kiln-stamp"
fi

node_dir="$tools/node"
stamp="node@$NODE_VERSION conformance@$CONFORMANCE_VERSION"
if [[ "$(cat "$node_dir/.kiln-stamp" 2>/dev/null)" != "$stamp" ]]; then
  if ! command -v npm >/dev/null; then
    echo "npm is needed to install Node $NODE_VERSION and the MCP conformance suite; install nodejs/npm (apt-get install -y npm)" >&2
    exit 1
  fi
  echo "installing node $NODE_VERSION and @modelcontextprotocol/conformance $CONFORMANCE_VERSION into $node_dir" >&2
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  (cd "$node_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund \
    "node@$NODE_VERSION" "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION" >&2)
  echo "$stamp" > "$node_dir/.kiln-stamp"
fi
