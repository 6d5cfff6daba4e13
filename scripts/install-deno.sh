#!/usr/bin/env bash
# Installs the pinned Deno into .kiln/tools/bin/deno from the PyPI `deno` package (a wheel that
# carries the official binary). Idempotent: does nothing if the pinned version is already there.
set -euo pipefail
DENO_VERSION="${KILN_DENO_VERSION:-2.9.8}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$root/.kiln/tools/bin"
deno="$bin_dir/deno"
if [[ -x "$deno" ]] && [[ "$("$deno" --version 2>/dev/null | head -n1)" == "deno $DENO_VERSION "* ]]; then
  exit 0
fi
mkdir -p "$bin_dir" "$root/.kiln/tools/cache"
cache="$root/.kiln/tools/cache"
echo "installing deno $DENO_VERSION from PyPI into $bin_dir" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "deno==$DENO_VERSION"
wheel="$(ls "$cache"/deno-"$DENO_VERSION"-*.whl | head -n1)"
python3 - "$wheel" "$deno" "$DENO_VERSION" <<'PY'
import os, sys, zipfile
wheel, dest, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    data = z.read(f"deno-{version}.data/scripts/deno")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
"$deno" --version | head -n1 >&2
