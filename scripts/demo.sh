#!/usr/bin/env bash
# The main job end to end on the embedded default: start a local `stowix serve` (local files +
# SQLite), build a real closure with Nix, push it with `stowix nix push`, then substitute it into
# a fresh store with signature checking and only the repository's key trusted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-prerequisites.sh
cargo build --release --locked --quiet
stowix=$PWD/target/release/stowix

work=$(mktemp -d -t stowix-demo.XXXXXX)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> starting stowix serve (data in $work/data)"
"$stowix" serve --listen 127.0.0.1:0 --data-dir "$work/data" >"$work/serve.out" 2>"$work/serve.log" &
server_pid=$!
for _ in $(seq 100); do
  grep -q '^listening on ' "$work/serve.out" 2>/dev/null && break
  sleep 0.1
done
base=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$base" ] || { cat "$work/serve.log"; echo "server did not start" >&2; exit 1; }

public_key=$("$stowix" admin --data-dir "$work/data" repo create demo)
export STOWIX_TARGET=$base/demo
STOWIX_TOKEN=$("$stowix" admin --data-dir "$work/data" token create --repo demo --scope push)
export STOWIX_TOKEN
echo "==> repository $STOWIX_TARGET, key $public_key"

echo "==> building a closure with Nix (input-addressed, so signatures matter)"
nonce=$(date +%s%N)
cat >"$work/closure.nix" <<NIX
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    nonce = "$nonce";
  };
  lib = mk "demo-lib" "/bin/mkdir -p \$out/lib && /bin/cp /bin/sh \$out/lib/ && /bin/cp /usr/bin/nix-store \$out/lib/ && /bin/echo hello > \$out/lib/data.txt";
  app = mk "demo-app" "/bin/mkdir -p \$out/bin && /bin/echo '#!/bin/sh' > \$out/bin/app && /bin/echo 'cat \${lib}/lib/data.txt' >> \$out/bin/app && /bin/chmod +x \$out/bin/app && /bin/ln -s \${lib}/lib \$out/lib";
in mk "demo-root" "/bin/mkdir \$out && /bin/ln -s \${app}/bin/app \$out/app && /bin/echo \${app} > \$out/deps"
NIX
# No substituters: the demo builds locally and must not wait on an unreachable cache.nixos.org.
root=$(nix-build "$work/closure.nix" --no-out-link --option substituters "")
nix-store -qR "$root"

echo "==> stowix nix push $root"
"$stowix" nix push --verbose "$root"

echo "==> substituting into a fresh store with require-sigs and only the repository key trusted"
XDG_CACHE_HOME=$work/cache nix --extra-experimental-features nix-command copy \
  --from "$STOWIX_TARGET" --to "$work/fresh-store" \
  --option trusted-public-keys "$public_key" --option require-sigs true \
  --option narinfo-cache-negative-ttl 0 "$root"
for path in $(nix-store -qR "$root"); do
  want=$(nix-store --dump "$path" | sha256sum | cut -d' ' -f1)
  got=$(nix-store --dump "$work/fresh-store$path" | sha256sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "NAR of $path differs after substitution" >&2; exit 1; }
done
echo "==> OK: $(nix-store -qR "$root" | wc -l) paths pushed, substituted and verified"

echo "==> pushing again uploads nothing"
"$stowix" nix push "$root"
