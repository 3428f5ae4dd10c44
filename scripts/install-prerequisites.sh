#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Stowix: Nix (the oracle every
# test checks against), Prometheus and its Pushgateway (the metrics tests start real ones)
# and the Rust components CI uses. Idempotent.
set -euo pipefail
if ! command -v nix-store >/dev/null || ! command -v nix >/dev/null; then
  echo "installing nix-bin from Debian's packages" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nix-bin >/dev/null
fi
if ! command -v prometheus-pushgateway >/dev/null || ! command -v prometheus >/dev/null; then
  echo "installing prometheus and prometheus-pushgateway from Debian's packages" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  # Only the binaries are wanted: the tests start their own instances on free ports.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null
  $SUDO systemctl disable --now prometheus prometheus-pushgateway >/dev/null 2>&1 || true
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; install Rust (rustup) first" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
