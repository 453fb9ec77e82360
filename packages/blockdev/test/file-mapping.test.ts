import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileBlockDevice, type FileMapping } from '../src/node/index.js';

// tmpfs: its holes are not resident pages, and a read fault on one would allocate a page.
const SHM = '/dev/shm';
const KiB = 1024;
const WINDOW = 64 * KiB;
const MAX_VIEW = 16 * KiB;

describe('FileMapping', () => {
  let dir: string;
  let path: string;
  let content: Buffer;
  beforeAll(async () => {
    dir = await mkdtemp(join(SHM, 'qcowkit-file-mapping-'));
    path = join(dir, 'data');
    // 4 windows and a bit; not a whole number of pages.
    content = randomFillSync(Buffer.alloc(4 * WINDOW + 5000));
    await writeFile(path, content);
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  const withMapping = async (
    run: (mapping: FileMapping, device: FileBlockDevice) => Promise<void> | void,
    maxWindows = 2,
    file = path,
  ) => {
    const device = await FileBlockDevice.open(file, { readOnly: true });
    try {
      const mapping = device.openMapping({ windowBytes: WINDOW, maxViewBytes: MAX_VIEW, maxWindows });
      expect(mapping).toBeDefined();
      try {
        await run(mapping!, device);
      } finally {
        mapping!.close();
      }
    } finally {
      await device.close();
    }
  };

  it('shows the file bytes in place, across window ends and up to the end of the file', async () => {
    await withMapping((mapping) => {
      const ranges: [number, number][] = [
        [0, 4096],
        [WINDOW - 8, MAX_VIEW], // ends in the next window: mapped as part of this one
        [3 * WINDOW + 100, 4000],
        [content.length - 1000, 1000], // the last, partial page
        [2 * WINDOW, MAX_VIEW],
      ];
      for (const [offset, length] of ranges) {
        const view = mapping.view(offset, length);
        expect(view, `view at ${offset}`).toBeDefined();
        expect(Buffer.compare(view!.bytes, content.subarray(offset, offset + length))).toBe(0);
        expect(view!.words.length).toBe(length >>> 2);
        const expected = content.readUInt32LE(offset + 8);
        expect(view!.words[2]).toBe(expected);
        view!.release();
        view!.release(); // idempotent
      }
      expect(mapping.mappedWindows).toBeLessThanOrEqual(2);
    });
  });

  it('refuses what it cannot show: past the end, too long, unaligned, empty', async () => {
    await withMapping((mapping) => {
      expect(mapping.view(content.length - 8, 12)).toBeUndefined();
      expect(mapping.view(content.length, 4)).toBeUndefined();
      expect(mapping.view(0, MAX_VIEW + 4)).toBeUndefined();
      expect(mapping.view(2, 16)).toBeUndefined();
      expect(mapping.view(0, 0)).toBeUndefined();
      expect(mapping.view(-4, 16)).toBeUndefined();
    });
  });

  it('maps at most maxWindows windows; a view needing another waits for a release', async () => {
    await withMapping((mapping) => {
      const first = mapping.view(0, 4096)!;
      const second = mapping.view(WINDOW, 4096)!;
      expect(mapping.mappedWindows).toBe(2);
      expect(mapping.view(2 * WINDOW, 4096)).toBeUndefined();
      // The windows held serve more views.
      const again = mapping.view(100 * 4, 4096);
      expect(again).toBeDefined();
      again!.release();
      first.release();
      const third = mapping.view(2 * WINDOW, 4096)!;
      expect(Buffer.compare(third.bytes, content.subarray(2 * WINDOW, 2 * WINDOW + 4096))).toBe(0);
      // The second window's bytes are still its own.
      expect(Buffer.compare(second.bytes, content.subarray(WINDOW, WINDOW + 4096))).toBe(0);
      expect(mapping.mappedWindows).toBe(2);
      second.release();
      third.release();
      // A short last window replaces a full one: its bytes are right.
      const last = mapping.view(4 * WINDOW, 4096)!;
      expect(Buffer.compare(last.bytes, content.subarray(4 * WINDOW, 4 * WINDOW + 4096))).toBe(0);
      last.release();
    });
  });

  it('keeps a held view valid after close, unmaps at its release, and gives no view after close', async () => {
    const device = await FileBlockDevice.open(path, { readOnly: true });
    try {
      const mapping = device.openMapping({ windowBytes: WINDOW, maxViewBytes: MAX_VIEW })!;
      const view = mapping.view(WINDOW, 8192)!;
      mapping.close();
      expect(mapping.view(0, 4096)).toBeUndefined();
      expect(mapping.mappedWindows).toBe(1);
      expect(Buffer.compare(view.bytes, content.subarray(WINDOW, WINDOW + 8192))).toBe(0);
      view.release();
      expect(mapping.mappedWindows).toBe(0);
      mapping.close(); // idempotent
    } finally {
      await device.close();
    }
  });

  it('closing the device closes its mappings', async () => {
    const device = await FileBlockDevice.open(path, { readOnly: true });
    const mapping = device.openMapping({ windowBytes: WINDOW, maxViewBytes: MAX_VIEW })!;
    mapping.view(0, 4096)!.release();
    await device.close();
    expect(mapping.mappedWindows).toBe(0);
    expect(mapping.view(0, 4096)).toBeUndefined();
    expect(device.openMapping()).toBeUndefined();
  });

  it('gives no view of a hole, and leaves the hole unallocated', async () => {
    const sparse = join(dir, 'sparse');
    await writeFile(sparse, Buffer.alloc(0));
    await truncate(sparse, 4 * WINDOW);
    const data = randomFillSync(Buffer.alloc(WINDOW));
    const { open } = await import('node:fs/promises');
    const handle = await open(sparse, 'r+');
    await handle.write(data, 0, WINDOW, WINDOW);
    await handle.close();
    const blocksBefore = (await stat(sparse)).blocks;
    await withMapping(
      (mapping) => {
        expect(mapping.view(0, 4096)).toBeUndefined();
        expect(mapping.view(WINDOW - 4096, 8192)).toBeUndefined(); // half hole, half data
        const inData = mapping.view(WINDOW, 8192)!;
        expect(Buffer.compare(inData.bytes, data.subarray(0, 8192))).toBe(0);
        inData.release();
        expect(mapping.view(3 * WINDOW, 4096)).toBeUndefined();
      },
      2,
      sparse,
    );
    expect((await stat(sparse)).blocks).toBe(blocksBefore);
  });

  it('maps nothing once the file no longer reaches a window (shrunk by someone ignoring locks)', async () => {
    const shrinking = join(dir, 'shrinking');
    await writeFile(shrinking, content);
    await withMapping(
      async (mapping) => {
        const first = mapping.view(0, 4096)!;
        first.release();
        await truncate(shrinking, WINDOW);
        // Window 2 would reach past the end: refused (never touched, so no SIGBUS).
        expect(mapping.view(2 * WINDOW, 4096)).toBeUndefined();
        expect(mapping.view(0, 4096)).toBeUndefined();
      },
      2,
      shrinking,
    );
  });

  it('is not offered where mapping is not safe: writable, -U, no lock, no native calls', async () => {
    const cases: Parameters<typeof FileBlockDevice.open>[1][] = [
      {},
      { readOnly: true, forceShare: true },
      { readOnly: true, lock: 'none' },
      { readOnly: true, native: false },
    ];
    for (const options of cases) {
      const device = await FileBlockDevice.open(path, options);
      try {
        expect(device.openMapping(), JSON.stringify(options)).toBeUndefined();
      } finally {
        await device.close();
      }
    }
  });
});
