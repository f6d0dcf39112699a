#!/usr/bin/env bash
# Installs what the local stack needs, idempotently:
#   - Debian's redis-server (apt-get when absent),
#   - curl and openssl (used by the example sender), sqlite3 (indexes the
#     broker's sqlite file, see stack.sh),
#   - Debian's prometheus package for promtool (alert rule checks),
#   - the Tansu broker into .tools/bin (cargo install, ~12 min once on 2
#     cores; reused from ~/.cache/hooklog/tansu-0.6.0 when present);
#   - what building Hooklog needs beyond Rust: Debian's OpenSSL headers and
#     pkg-config (the Kafka client's TLS links OpenSSL).
# `install.sh build` installs only the last.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
TANSU_VERSION=0.6.0
cache="${HOME}/.cache/hooklog/tansu-${TANSU_VERSION}"

apt_install() {
  echo "install: apt-get install $*"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

build_apt=()
pkg-config --exists openssl 2>/dev/null || build_apt+=(libssl-dev pkg-config)
if [ "${1:-}" = build ]; then
  [ ${#build_apt[@]} -eq 0 ] || apt_install "${build_apt[@]}"
  exit 0
fi

need_apt=("${build_apt[@]}")
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# sqlite3 adds the header index Tansu 0.6's sqlite schema lacks.
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
# promtool validates deploy/monitoring/alerts.yaml (make lint).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi

tansu="$root/.tools/bin/tansu"
if [ ! -x "$tansu" ]; then
  if [ -x "$cache/bin/tansu" ]; then
    mkdir -p "$root/.tools/bin"
    cp "$cache/bin/tansu" "$tansu"
  else
    echo "install: building Tansu ${TANSU_VERSION} (once; about 12 minutes on 2 cores)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql --root "$root/.tools"
    mkdir -p "$cache/bin" && cp "$tansu" "$cache/bin/tansu" || true
  fi
fi
"$tansu" --version >/dev/null
