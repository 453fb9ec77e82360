// The `node:module` that blockdev's libc.js sees inside the qcow2 bin's CommonJS bundle
// (scripts/bundle-bin.mjs, plugin fast-koffi). Kept as a file of its own so that tests can load
// it (test/koffi-stand-in.test.ts) exactly as the bundle does.
//
// koffi's entry finds its prebuilt binary by reading the ELF header of the node executable (glibc
// or musl), loads three modules on the way and wraps a few functions with deprecation warnings:
// ~7 ms of every start that opens a file, against ~1.5 ms for the binary itself. Here
// `createRequire(from)('koffi')` loads `@koromix/koffi-PLATFORM-ARCH/PLATFORM_ARCH/koffi.node`
// (the package koffi installs next to itself) directly when it is there, reports the installed
// koffi's version and the system is glibc-based Linux on x64 or arm64; anything else (another
// layout or version, musl, another system, a failure) goes through koffi's own entry. blockdev
// uses only the binary's own API (load, func, errno, os.errno), which the wrapper does not change.
'use strict';
const { existsSync, readFileSync, realpathSync } = require('node:fs');
const { dirname, join } = require('node:path');
const { fileURLToPath } = require('node:url');

const MUSL_LOADER = { x64: '/lib/ld-musl-x86_64.so.1', arm64: '/lib/ld-musl-aarch64.so.1' };

// The koffi folder as require finds it (node_modules of this folder or one above, symbolic links
// resolved: pnpm installs the binary's package next to koffi's real folder), without require's
// own resolution, which loads its package-exports machinery (~2 ms).
function koffiFolder(from) {
  for (let dir = from; ; dir = dirname(dir)) {
    const candidate = join(dir, 'node_modules', 'koffi');
    if (!dir.endsWith('/node_modules') && existsSync(join(candidate, 'package.json'))) {
      return realpathSync.native(candidate);
    }
    if (dirname(dir) === dir) return undefined;
  }
}

// koffi's binary for a module at `from` (a path or a file: URL), loaded with `load` (require), or
// undefined when it cannot be had this way.
function loadKoffiBinary(load, from) {
  const { platform, arch } = process;
  if (platform !== 'linux' || MUSL_LOADER[arch] === undefined || existsSync(MUSL_LOADER[arch])) {
    return undefined;
  }
  try {
    const root = koffiFolder(dirname(from.startsWith('file:') ? fileURLToPath(from) : from));
    if (root === undefined) return undefined;
    const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
    const binary = join(
      root,
      '..',
      '@koromix',
      `koffi-${platform}-${arch}`,
      `${platform}_${arch}`,
      'koffi.node',
    );
    const native = load(binary);
    return native !== null && typeof native === 'object' && native.version === version ? native : undefined;
  } catch {
    return undefined;
  }
}

// node:module itself only when something other than koffi's binary is asked for (~0.3 ms).
const builtin = () => require('node:module');

// An addon loaded as require loads one, without require's resolution of an absolute path (a stat
// and a realpath of every folder on the way: ~0.7 ms for pnpm's deep store paths); loaded once.
let addon;
function loadAddon(path) {
  if (addon?.path !== path) {
    const module = { exports: {} };
    process.dlopen(module, path);
    addon = { path, exports: module.exports };
  }
  return addon.exports;
}

module.exports = {
  // \`from\`: a path or a file: URL (the bundle gives blockdev's libc.js its own file name).
  createRequire(from) {
    let real;
    const load = () => {
      real ??= builtin().createRequire(from);
      return real;
    };
    const wrapped = (id) =>
      id === 'koffi' ? (loadKoffiBinary(loadAddon, String(from)) ?? load()(id)) : load()(id);
    wrapped.resolve = (request, options) => load().resolve(request, options);
    return wrapped;
  },
  loadKoffiBinary,
};
