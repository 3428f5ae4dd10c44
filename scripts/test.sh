#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that drive the real `stowix`
# binary against real Nix. Installs Nix first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-prerequisites.sh
cargo test --locked "$@"
