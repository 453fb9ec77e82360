/**
 * qcow2-nbd -B NAME (the qemu:dirty-bitmap:NAME meta context) with qemu-nbd as the oracle: the same
 * image, with persistent bitmaps made by qemu-img bitmap and qemu-io writes, served by both. The
 * contexts nbdinfo lists, the maps it prints for each bitmap (read-only, and live on a writable
 * export after writes through it), and the refusals (a missing bitmap, a raw file, an inconsistent
 * bitmap) with their words and exit codes must be the same.
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { must, NBD_BIN, runAsync, runNbdsh, startQemuNbd, startServer } from '../src/nbd-server.js';
import { requireTools, run, tempDir } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdsh');

/**
 * BLOCK_STATUS requests on two bitmap contexts at once: unaligned, short, REQ_ONE, at the end.
 * Prints each reply's descriptors per context.
 */
const BLOCK_STATUS_SCRIPT = `
import os
h.add_meta_context("qemu:dirty-bitmap:fine")
h.add_meta_context("qemu:dirty-bitmap:coarse")
h.connect_uri(os.environ["URI"])
ONE = nbd.CMD_FLAG_REQ_ONE
for (offset, length, flags) in [(0, 8 << 20, 0), (1000, 70000, 0), (100, 8000000, ONE),
        (1048577, 1048575, 0), (102399, 2, ONE), (5 << 20, 12288, 0), ((8 << 20) - 1, 1, 0),
        (7 << 20, 1 << 20, ONE)]:
    replies = []
    h.block_status(length, offset, lambda context, at, entries, error: replies.append((context, list(entries))) or 0, flags)
    print(offset, length, flags, sorted(replies))
h.shutdown()
`;

const nbdinfo = (args: readonly string[]) => must('nbdinfo', args);

async function contexts(uri: string): Promise<string[]> {
  const listed = JSON.parse(await nbdinfo(['--list', '--json', uri])) as {
    exports: { contexts: string[] }[];
  };
  return listed.exports[0]!.contexts;
}

async function maps(uri: string, names: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const name of names) out.push(await nbdinfo([`--map=qemu:dirty-bitmap:${name}`, uri]));
  return out;
}

describe.skipIf(!ok)('qemu:dirty-bitmap (-B) against qemu-nbd', () => {
  let dir: { path: string; remove: () => void };
  let image: string;
  beforeAll(() => {
    dir = tempDir('qcowkit-nbd-bitmap-');
    image = join(dir.path, 'disk.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '8M']);
    run('qemu-img', ['bitmap', '--add', image, 'coarse']);
    run('qemu-img', ['bitmap', '--add', '-g', '4096', image, 'fine']);
    run('qemu-img', ['bitmap', '--add', image, 'empty']);
    run('qemu-img', ['bitmap', '--disable', image, 'empty']);
    run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write 0 4k',
      '-c',
      'write 100k 70k',
      '-c',
      'write 1M 1M',
      '-c',
      'write -z 5M 8k',
      '-c',
      'discard 7M 12k',
      '-c',
      'write 8384512 4096',
      image,
    ]);
  });
  afterAll(() => dir?.remove());

  const names = ['coarse', 'fine', 'empty'];
  const flags = names.flatMap((name) => ['-B', name]);

  it('lists the same contexts and prints the same maps on a read-only export', async () => {
    const theirs = startQemuNbd(dir.path, ['-r', '-f', 'qcow2', '-A', ...flags, image]);
    const ours = await startServer(dir.path, ['-t', '-r', '-f', 'qcow2', '-A', ...flags, image]);
    try {
      const expected = await contexts(theirs.uri);
      expect(expected).toContain('qemu:dirty-bitmap:fine');
      expect(await contexts(ours.uri)).toEqual(expected);
      const expectedMaps = await maps(theirs.uri, names);
      expect(expectedMaps[1]).toContain('dirty');
      expect(await maps(ours.uri, names)).toEqual(expectedMaps);
    } finally {
      await theirs.stop();
      expect(await ours.stop()).toBe(0);
    }
  });

  it('answers unaligned, short and REQ_ONE block status requests as qemu-nbd', async () => {
    const theirs = startQemuNbd(dir.path, ['-r', '-f', 'qcow2', ...flags, image]);
    const ours = await startServer(dir.path, ['-t', '-r', '-f', 'qcow2', ...flags, image]);
    try {
      const expected = await runNbdsh(BLOCK_STATUS_SCRIPT, { URI: theirs.uri });
      expect(expected.status, expected.stderr).toBe(0);
      expect(expected.stdout.split('\n')).toHaveLength(9);
      const actual = await runNbdsh(BLOCK_STATUS_SCRIPT, { URI: ours.uri });
      expect(actual.stdout).toBe(expected.stdout);
    } finally {
      await theirs.stop();
      expect(await ours.stop()).toBe(0);
    }
  });

  it('reports writes through a writable export at once, as qemu-nbd', async () => {
    const oursImage = join(dir.path, 'ours.qcow2');
    const theirsImage = join(dir.path, 'theirs.qcow2');
    copyFileSync(image, oursImage);
    copyFileSync(image, theirsImage);
    const theirs = startQemuNbd(dir.path, ['-f', 'qcow2', ...flags, theirsImage]);
    const ours = await startServer(dir.path, ['-t', '-f', 'qcow2', ...flags, oursImage]);
    try {
      for (const uri of [theirs.uri, ours.uri]) {
        run('qemu-io', ['-f', 'raw', '-c', 'write 3M 4k', '-c', 'write -z 6M 100k', uri]);
      }
      const expected = await maps(theirs.uri, names);
      expect(expected[1]).toMatch(/^\s*3145728\s+\d+\s+1\s+dirty$/m);
      expect(await maps(ours.uri, names)).toEqual(expected);
    } finally {
      await theirs.stop();
      expect(await ours.stop()).toBe(0);
    }
    // Both stored the bits on closing: the bitmaps read back the same.
    expect(run('qemu-img', ['compare', oursImage, theirsImage])).toContain('identical');
    const reread = startQemuNbd(dir.path, ['-r', '-f', 'qcow2', ...flags, oursImage]);
    const rereadTheirs = startQemuNbd(dir.path, ['-r', '-f', 'qcow2', ...flags, theirsImage]);
    try {
      expect(await maps(reread.uri, names)).toEqual(await maps(rereadTheirs.uri, names));
    } finally {
      await reread.stop();
      await rereadTheirs.stop();
    }
  });

  it('with -s, exports the bitmap of the image, which writes to the overlay leave alone, as qemu-nbd', async () => {
    const theirs = startQemuNbd(dir.path, ['-s', '-f', 'qcow2', ...flags, image]);
    const ours = await startServer(dir.path, ['-t', '-s', '-f', 'qcow2', ...flags, image]);
    try {
      for (const uri of [theirs.uri, ours.uri]) run('qemu-io', ['-f', 'raw', '-c', 'write 3M 4k', uri]);
      const expected = await maps(theirs.uri, names);
      expect(expected[1]).not.toMatch(/^\s*3145728\s/m);
      expect(await maps(ours.uri, names)).toEqual(expected);
    } finally {
      await theirs.stop();
      expect(await ours.stop()).toBe(0);
    }
  });

  it('refuses a missing bitmap, a raw file and an inconsistent bitmap with qemu-nbd words', async () => {
    const raw = join(dir.path, 'disk.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', raw, '1M']);
    const stale = join(dir.path, 'stale.qcow2');
    copyFileSync(image, stale);
    // A writer killed while serving leaves its enabled bitmaps in use (inconsistent).
    await startQemuNbd(dir.path, ['-f', 'qcow2', stale]).stop('SIGKILL');
    const cases = [
      ['-r', '-f', 'qcow2', '-B', 'nope', image],
      ['-r', '-f', 'raw', '-B', 'coarse', raw],
      ['-r', '-f', 'qcow2', '-B', 'fine', stale],
      ['-f', 'qcow2', '-B', 'fine', stale],
    ];
    for (const args of cases) {
      const socket = join(dir.path, 'refused.sock');
      const theirs = await runAsync('qemu-nbd', ['-k', socket, ...args]);
      const ours = await runAsync(process.execPath, [NBD_BIN, '-k', socket, ...args]);
      expect(theirs.status).toBe(1);
      expect(ours.status).toBe(theirs.status);
      expect(ours.stderr.replace(/^qcow2-nbd: /, '')).toBe(theirs.stderr.replace(/^qemu-nbd: /, ''));
    }
  });
});
