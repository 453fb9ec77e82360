#!/usr/bin/env bash
# Sets up a fresh machine for qcowkit: pnpm (the version pinned in package.json), the QEMU and
# NBD tools the end-to-end tests and benchmarks compare against, the workspace dependencies, and
# a build. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_pnpm=$(node -p "require('./package.json').packageManager.split('@')[1]")
if [ "$(pnpm --version 2>/dev/null || true)" != "$want_pnpm" ]; then
  echo "setup: installing pnpm $want_pnpm"
  npm install --global --no-fund --no-audit "pnpm@$want_pnpm" >/dev/null
fi

# Debian packages: qemu-img/qemu-io/qemu-nbd, nbdinfo/nbdcopy/nbdfuse, fio, fuse3 (nbdkit and
# nbdsh are for benchmarks and hand-made protocol tests).
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdsh >/dev/null || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    echo "setup: installing ${need[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: no apt-get here; install ${need[*]} yourself for the end-to-end tests" >&2
  fi
fi

if [ -n "${CI:-}" ]; then
  pnpm install --frozen-lockfile
else
  pnpm install
fi
pnpm build
