#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine with only Rust installed: installs
# what the tests start themselves (redis-server; node and npm for the MCP reference server;
# kill(1)) when missing, then `cargo test --workspace`. Every test starts its own servers on 127.0.0.1 and
# stops them. Extra arguments go to cargo test (e.g. `bash tests/run.sh -- api_`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# the fault tests signal processes with kill(1) (`type -P`: the shell's builtin does not count)
type -P kill >/dev/null 2>&1 || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "tests/run.sh: missing ${need[*]}; install them (apt-get install -y ${need[*]})" >&2
      exit 3
    }
    sudo=(sudo)
  fi
  echo "tests/run.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the MCP server nobody here wrote, for interop tests (npm, bound to 127.0.0.1 by the tests)
bash tests/peers/install.sh

exec cargo test --workspace "$@"
