#!/usr/bin/env bash
# `make test` on a plain Debian 12, in a chroot built by debootstrap from
# Debian's own packages. Into it goes only what a developer installs by
# hand before cloning (git, make, a C toolchain, Python 3 with venv,
# Debian's Node.js 18 and npm); this machine's Rust toolchain and this
# source tree are bound in at the same paths, so cargo reuses target/.
# Then `make test` runs there and must install the rest itself (PyPI
# packages into a virtual environment, Chromium after `apt-get update`,
# Node.js 20 from npm) and pass. Before that, it runs `make test` once in
# the bare chroot (nothing installed) to show that what it cannot install
# is named in one line.
#   scripts/debian-check.sh [CHROOT_DIR=/var/tmp/flywheel-debian12] [full|setup] [TEST ARGS]
# `setup` stops where the tests would run: `scripts/test.sh --no-run`
# (every install step, then the tests compiled, not run); TEST ARGS after
# `full` go to scripts/test.sh (cargo test), e.g. `--test postgres_outage`.
# The bare step is bare only in a new CHROOT_DIR.
# Needs root (debootstrap, chroot, bind mounts), the network to Debian's
# mirror, PyPI and npm, and PostgreSQL on 127.0.0.1:5432 as for `make test`.
set -euo pipefail
root=${1:-/var/tmp/flywheel-debian12}
mode=${2:-full}
src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot and bind mounts need it)" >&2; exit 1; }
command -v debootstrap >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q debootstrap >/dev/null; }
if [ ! -x "$root/usr/bin/apt-get" ]; then
  echo "== debootstrap bookworm into $root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
# Certificate authorities this machine adds to Debian's (a network that
# intercepts TLS has one), so the chroot reaches the same package indexes.
mkdir -p "$root/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true

mounted=()
bind() { # host path, then its path in the chroot (default: the same)
  local to="$root${2:-$1}"
  mkdir -p "$to"
  mount --bind "$1" "$to"
  mounted=("$to" "${mounted[@]}")
}
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
mkdir -p "$root/proc" "$root/sys"
mount -t proc proc "$root/proc"; mounted=("$root/proc")
bind /sys; bind /dev; bind /dev/pts
bind "$src"
bind "${RUSTUP_HOME:-$HOME/.rustup}" /root/.rustup
bind "${CARGO_HOME:-$HOME/.cargo}" /root/.cargo
# What make test installs under target/ stays the chroot's own.
for d in test-venv node; do
  mkdir -p "$root/var/cache/flywheel-check/$d" "$src/target/$d"
  bind "$root/var/cache/flywheel-check/$d" "$src/target/$d"
done

in_chroot() {
  # Python's and Node's own certificate lists do not hold a local
  # authority: they are pointed at the system's bundle.
  local bundle=/etc/ssl/certs/ca-certificates.crt
  chroot "$root" env -i HOME=/root TERM=dumb \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle NODE_EXTRA_CA_CERTS=$bundle \
    bash -c "$1"
}

echo "== make test in the bare chroot (expected: one line naming what is missing)"
in_chroot "cd '$src' && bash scripts/test.sh --no-run" 2>&1 | tail -3 || true

echo "== what a developer installs first"
in_chroot "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
  ca-certificates git make build-essential python3 python3-venv nodejs npm >/dev/null \
  && update-ca-certificates >/dev/null"
in_chroot "node --version; npm --version; python3 --version; cc --version | head -1"

if [ "$mode" = setup ]; then
  echo "== make test's set-up, the tests compiled but not run"
  in_chroot "cd '$src' && bash scripts/test.sh --no-run"
else
  echo "== make test ${*:3}"
  in_chroot "cd '$src' && bash scripts/test.sh ${*:3}"
fi
