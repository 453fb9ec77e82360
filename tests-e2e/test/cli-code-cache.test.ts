/**
 * The built `qcow2` bin runs its bundle through a V8 code cache under `os.tmpdir()`
 * (packages/qcow2-cli/scripts/bundle-bin.mjs --code-cache). Each test points TMPDIR at a fresh
 * folder and checks that a run without the cache, a run from it, a corrupt cache and a folder that
 * is not the user's own all give qemu-img's result with nothing extra on stderr. A compressed image
 * is the input: its codec is loaded lazily, the path a cached function must still be able to take.
 */
import { chmodSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const uid = typeof process.getuid === 'function' ? process.getuid() : -1;

describe.skipIf(!haveTools)('qcow2 bin code cache', () => {
  let dir: { path: string; remove: () => void };
  let image: string;
  let expected: Buffer;
  let runs = 0;

  beforeAll(() => {
    dir = tempDir('qcowkit-code-cache-');
    const plain = join(dir.path, 'plain.qcow2');
    image = join(dir.path, 'compressed.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', plain, '4M']);
    run('qemu-io', ['-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 2M 64k', plain]);
    run('qemu-img', ['convert', '-c', '-O', 'qcow2', plain, image]);
    const reference = join(dir.path, 'reference.raw');
    run('qemu-img', ['convert', '-O', 'raw', image, reference]);
    expected = readFileSync(reference);
  });
  afterAll(() => dir?.remove());

  /** `qcow2 convert -O raw` of the compressed image with TMPDIR=tmp; its output must be qemu-img's. */
  const convert = (tmp: string, env: NodeJS.ProcessEnv = {}) => {
    const target = join(dir.path, `out-${runs++}.raw`);
    const result = qcow2(['convert', '-O', 'raw', image, target], {
      env: { ...process.env, TMPDIR: tmp, QCOW2_DEBUG: undefined, QCOWKIT_CODE_CACHE: undefined, ...env },
    });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    expect(readFileSync(target).equals(expected)).toBe(true);
  };
  const cacheFolder = (tmp: string) => join(tmp, `qcowkit-code-cache-${uid}`);
  const cacheFiles = (tmp: string) => readdirSync(cacheFolder(tmp)).filter((name) => name.endsWith('.v8'));

  test('a first run writes the cache, later runs use it', () => {
    const tmp = join(dir.path, 'fresh');
    mkdirSync(tmp);
    convert(tmp);
    const files = cacheFiles(tmp);
    expect(files).toHaveLength(1);
    expect(files[0]).toMatch(
      new RegExp(`^qcow2-[0-9a-f]{16}-${process.version}-${process.arch}-convert\\.own\\.v8$`),
    );
    const written = readFileSync(join(cacheFolder(tmp), files[0] as string));
    expect(written.length).toBeGreaterThan(0);
    convert(tmp);
    convert(tmp);
    // A usable cache is read, not rewritten.
    expect(readFileSync(join(cacheFolder(tmp), files[0] as string)).equals(written)).toBe(true);
  });

  test('a corrupt cache is replaced', () => {
    const tmp = join(dir.path, 'corrupt');
    mkdirSync(tmp);
    convert(tmp);
    const file = join(cacheFolder(tmp), cacheFiles(tmp)[0] as string);
    writeFileSync(file, Buffer.alloc(4096, 0x77));
    convert(tmp);
    expect(readFileSync(file).equals(Buffer.alloc(4096, 0x77))).toBe(false);
    convert(tmp);
  });

  test('a cache folder others can write is neither read nor written', () => {
    const tmp = join(dir.path, 'shared');
    mkdirSync(cacheFolder(tmp), { recursive: true });
    chmodSync(cacheFolder(tmp), 0o777);
    writeFileSync(join(cacheFolder(tmp), 'planted.v8'), 'x');
    convert(tmp);
    expect(readdirSync(cacheFolder(tmp))).toEqual(['planted.v8']);
  });

  test("a plain create runs from create's own bundle, a line it declines from the whole CLI's", () => {
    const create = (tmp: string, args: string[]) => {
      mkdirSync(tmp);
      const result = qcow2(['create', '-q', '-f', 'qcow2', ...args], {
        cwd: dir.path,
        env: { ...process.env, TMPDIR: tmp, QCOW2_DEBUG: undefined, QCOWKIT_CODE_CACHE: undefined },
      });
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
      return cacheFiles(tmp).map((name) => name.replace(/^qcow2-[0-9a-f]{16}-[^-]+-[^-]+-/, ''));
    };
    expect(create(join(dir.path, 'own'), ['own.qcow2', '1P'])).toEqual(['create.own.v8']);
    run('qemu-img', ['check', '-q', join(dir.path, 'own.qcow2')]);
    // A backing file to open: the image engine, which create's own bundle leaves out.
    expect(create(join(dir.path, 'declined'), ['-b', 'own.qcow2', '-F', 'qcow2', 'declined.qcow2'])).toEqual([
      'create.v8',
    ]);
    expect(run('qemu-img', ['info', join(dir.path, 'declined.qcow2')])).toContain('backing file: own.qcow2');
  });

  test("convert runs from convert's own bundle, a cache for each output format; a line it declines from the whole CLI's", () => {
    const convertTo = (tmp: string, args: string[], target: string) => {
      const result = qcow2(['convert', ...args, image, join(dir.path, target)], {
        env: { ...process.env, TMPDIR: tmp, QCOW2_DEBUG: undefined, QCOWKIT_CODE_CACHE: undefined },
      });
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
      return cacheFiles(tmp).map((name) => name.replace(/^qcow2-[0-9a-f]{16}-[^-]+-[^-]+-/, ''));
    };
    const tmp = join(dir.path, 'variants');
    mkdirSync(tmp);
    expect(convertTo(tmp, ['-O', 'raw'], 'variant.raw')).toEqual(['convert.own.v8']);
    expect(readFileSync(join(dir.path, 'variant.raw')).equals(expected)).toBe(true);
    // -c: the compression workers (node:worker_threads is loaded on first use in the bundle).
    expect(convertTo(tmp, ['-c', '-O', 'qcow2', '-t', 'writeback'], 'variant.qcow2').sort()).toEqual([
      'convert-O-qcow2.own.v8',
      'convert.own.v8',
    ]);
    run('qemu-img', ['check', '-q', join(dir.path, 'variant.qcow2')]);
    run('qemu-img', ['compare', '-q', image, join(dir.path, 'variant.qcow2')]);
    // An attached option value: commander's to read, in the whole CLI's bundle.
    expect(convertTo(tmp, ['-Oqcow2', '-o', 'cluster_size=4k'], 'attached.qcow2').sort()).toEqual([
      'convert-O-qcow2.own.v8',
      'convert.own.v8',
      'convert.v8',
    ]);
    run('qemu-img', ['compare', '-q', image, join(dir.path, 'attached.qcow2')]);
    expect(run('qemu-img', ['info', join(dir.path, 'attached.qcow2')])).toContain('cluster_size: 4096');
  });

  test('snapshot -c, -l, -a and -d each have a cache of their own, and do what qemu-img does', () => {
    const tmp = join(dir.path, 'snapshot-variants');
    mkdirSync(tmp);
    const ours = join(dir.path, 'snap-ours.qcow2');
    const theirs = join(dir.path, 'snap-theirs.qcow2');
    run('qemu-img', ['convert', '-O', 'qcow2', image, ours]);
    run('qemu-img', ['convert', '-O', 'qcow2', image, theirs]);
    const snapshot = (args: string[]) => {
      const result = qcow2(['snapshot', ...args, ours], {
        env: { ...process.env, TMPDIR: tmp, QCOW2_DEBUG: undefined, QCOWKIT_CODE_CACHE: undefined },
      });
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
      run('qemu-img', ['snapshot', ...args, theirs]);
      return cacheFiles(tmp)
        .map((name) => name.replace(/^qcow2-[0-9a-f]{16}-[^-]+-[^-]+-/, ''))
        .sort();
    };
    /** What each image holds: its snapshots (ids, names, sizes; not dates) and its guest data. */
    const same = () => {
      const list = (file: string) =>
        run('qemu-img', ['snapshot', '-l', file])
          .split('\n')
          .slice(2)
          .map((line) => line.split(/\s+/).slice(0, 4).join(' '));
      expect(list(ours)).toEqual(list(theirs));
      run('qemu-img', ['check', '-q', ours]);
      run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', ours, theirs]);
    };
    expect(snapshot(['-c', 'first'])).toEqual(['snapshot-c.own.v8']);
    same();
    run('qemu-io', ['-c', 'write -P 0x11 0 64k', ours]);
    run('qemu-io', ['-c', 'write -P 0x11 0 64k', theirs]);
    expect(snapshot(['-c', 'second'])).toEqual(['snapshot-c.own.v8']);
    expect(snapshot(['-a', 'first'])).toEqual(['snapshot-a.own.v8', 'snapshot-c.own.v8']);
    same();
    expect(snapshot(['-d', 'first'])).toEqual([
      'snapshot-a.own.v8',
      'snapshot-c.own.v8',
      'snapshot-d.own.v8',
    ]);
    same();
    const listed = qcow2(['snapshot', '-l', ours], {
      env: { ...process.env, TMPDIR: tmp, QCOW2_DEBUG: undefined, QCOWKIT_CODE_CACHE: undefined },
    });
    expect(listed.status).toBe(0);
    expect(listed.stdout).toContain('second');
    expect(cacheFiles(tmp).length).toBe(4);
  });

  test('no usable temporary folder, or the cache turned off: the command still runs', () => {
    const file = join(dir.path, 'a-file');
    writeFileSync(file, '');
    convert(file);
    convert(join(file, 'below-a-file'));
    const off = join(dir.path, 'off');
    mkdirSync(off);
    convert(off, { QCOWKIT_CODE_CACHE: '0' });
    expect(readdirSync(off)).toEqual([]);
  });
});
