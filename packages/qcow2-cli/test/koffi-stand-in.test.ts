/**
 * scripts/koffi-stand-in.cjs, the `node:module` blockdev's libc.js gets in the qcow2 bundle: it
 * loads koffi's binary directly where koffi installed it, and otherwise falls back to koffi's own
 * entry. The installed layout is checked too, so that a koffi upgrade that moves the binary fails
 * here instead of silently costing every start ~7 ms.
 */
import {
  mkdirSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

interface StandIn {
  createRequire(from: string): ((id: string) => unknown) & { resolve(id: string): string };
  loadKoffiBinary(load: (path: string) => unknown, from: string): { version: string } | undefined;
}

const require = createRequire(import.meta.url);
const standIn = require('../scripts/koffi-stand-in.cjs') as StandIn;
const blockdevLibc = require.resolve('@qcowkit/blockdev/node').replace(/index\.js$/, 'libc.js');
const { platform, arch } = process;
const binaryDir = `@koromix/koffi-${platform}-${arch}/${platform}_${arch}`;
/** Where the direct load applies (glibc Linux on x64 or arm64). */
const direct =
  platform === 'linux' &&
  (arch === 'x64' || arch === 'arm64') &&
  typeof (process.report.getReport() as { header?: { glibcVersionRuntime?: unknown } }).header
    ?.glibcVersionRuntime === 'string';

describe('koffi stand-in', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcowkit-koffi-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test("the installed koffi's binary loads directly, as the bundle loads it for blockdev", () => {
    const native = standIn.loadKoffiBinary(require, blockdevLibc);
    const koffiRequire = createRequire(blockdevLibc);
    const { version } = JSON.parse(
      readFileSync(join(dirname(koffiRequire.resolve('koffi')), 'package.json'), 'utf8'),
    ) as { version: string };
    if (!direct) {
      expect(native).toBeUndefined();
      return;
    }
    expect(native?.version).toBe(version);
    // What blockdev calls on it, loaded once whether libc.js is named by a path (as the bundle
    // names it) or a file: URL.
    const api = standIn.createRequire(blockdevLibc)('koffi') as Record<string, unknown>;
    expect(api.version).toBe(version);
    expect(standIn.createRequire(`file://${blockdevLibc}`)('koffi')).toBe(api);
    for (const name of ['load', 'errno']) expect(typeof api[name]).toBe('function');
    expect(standIn.createRequire(blockdevLibc).resolve('koffi')).toBe(koffiRequire.resolve('koffi'));
  });

  test('the layouts npm and pnpm make; a version mismatch or no binary is refused', () => {
    // npm: node_modules/koffi and node_modules/@koromix/... side by side.
    const flat = join(dir, 'flat');
    mkdirSync(join(flat, 'node_modules', 'koffi'), { recursive: true });
    writeFileSync(join(flat, 'node_modules', 'koffi', 'package.json'), '{ "version": "9.1.0" }');
    const module = join(flat, 'node_modules', 'app', 'dist', 'node', 'libc.js');
    const loaded: string[] = [];
    const load = (version: string) => (path: string) => {
      loaded.push(path);
      return { version };
    };
    if (!direct) {
      // musl, another system or architecture: always koffi's entry.
      expect(standIn.loadKoffiBinary(load('9.1.0'), module)).toBeUndefined();
      expect(loaded).toEqual([]);
      return;
    }
    expect(standIn.loadKoffiBinary(load('9.1.0'), module)).toEqual({ version: '9.1.0' });
    expect(loaded).toEqual([join(flat, 'node_modules', binaryDir, 'koffi.node')]);
    expect(standIn.loadKoffiBinary(load('9.0.0'), module)).toBeUndefined();
    expect(
      standIn.loadKoffiBinary(() => {
        throw new Error('Cannot find module');
      }, module),
    ).toBeUndefined();

    // pnpm: the package's koffi is a link into the store, the binary next to its real folder.
    const store = join(dir, 'pnpm', 'node_modules', '.pnpm', 'koffi@9.1.0', 'node_modules');
    mkdirSync(join(store, 'koffi'), { recursive: true });
    writeFileSync(join(store, 'koffi', 'package.json'), '{ "version": "9.1.0" }');
    const pkg = join(dir, 'pnpm', 'packages', 'blockdev');
    mkdirSync(join(pkg, 'node_modules'), { recursive: true });
    symlinkSync(join(store, 'koffi'), join(pkg, 'node_modules', 'koffi'));
    loaded.length = 0;
    expect(standIn.loadKoffiBinary(load('9.1.0'), join(pkg, 'dist', 'node', 'libc.js'))).toBeDefined();
    expect(loaded).toEqual([join(realpathSync(store), binaryDir, 'koffi.node')]);

    // No koffi anywhere above.
    expect(standIn.loadKoffiBinary(load('9.1.0'), join(dir, 'libc.js'))).toBeUndefined();
  });

  test("anything else goes through koffi's entry and Node's own require", () => {
    // A koffi whose binary is not where the direct load looks: its entry is what loads.
    const app = join(dir, 'entry');
    mkdirSync(join(app, 'node_modules', 'koffi'), { recursive: true });
    writeFileSync(
      join(app, 'node_modules', 'koffi', 'package.json'),
      '{ "name": "koffi", "version": "9.2.0", "main": "index.js" }',
    );
    writeFileSync(join(app, 'node_modules', 'koffi', 'index.js'), 'module.exports = { entry: true };');
    const appRequire = standIn.createRequire(join(app, 'libc.js'));
    expect(appRequire('koffi')).toEqual({ entry: true });
    expect(appRequire('node:path')).toBe(require('node:path'));
  });
});
