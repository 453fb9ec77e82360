/**
 * Crash safety of the offline operations: each runs on an image behind a device that loses every
 * unflushed write at operation N, for every N until the operation completes. After each crash the
 * image must show no corruption (leaks are allowed, and so is a COPIED flag missing on a cluster
 * whose refcount just dropped to 1: harmless, QEMU has the same window), the guest data must be
 * intact where the operation keeps it, and `check -r all` must leave the image clean.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTools, run, tempDir } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image } from '../src/check/index.js';
import { Qcow2Image } from '../src/image.js';
import { amendImage, emptyImage, resizeImage } from '../src/ops/index.js';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../src/snapshot/index.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

/** A missing COPIED flag on a cluster whose refcount is 1: a needless copy later, no harm. */
const BENIGN = /^ERROR OFLAG_COPIED (L2|data) cluster: .* refcount=1$/;

/** Hash of the guest's first `length` bytes (read from a copy: closing the image closes its file). */
async function guestHash(device: BlockDevice, length: number): Promise<string> {
  const copy = MemoryBlockDevice.from(await device.read(0, device.size));
  const image = await Qcow2Image.open(copy, { readOnly: true });
  try {
    return createHash('sha256')
      .update(await image.read(0, Math.min(length, image.size)))
      .digest('hex');
  } finally {
    await image.close();
  }
}

describe.skipIf(!haveQemu)('offline operations survive a crash at any point', () => {
  let dir: { path: string; remove: () => void };
  let pristine: Buffer;
  const GUEST = 8 * 1024 * 1024;
  beforeAll(() => {
    dir = tempDir('qcowkit-ops-crash-');
    const path = join(dir.path, 'base.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', path, '8M']);
    run('qemu-io', ['-c', 'write -P 1 0 100k', '-c', 'write -c 1M 4k', '-c', 'write -z 2M 8k', path]);
    run('qemu-img', ['snapshot', '-c', 'old', path]);
    run('qemu-io', ['-c', 'write -P 2 16k 32k', '-c', 'write -P 3 5M 12k', path]);
    pristine = readFileSync(path);
  });
  afterAll(() => dir.remove());

  it.each([
    ['snapshot create', (f: BlockDevice) => createSnapshot(f, 'new'), true],
    ['snapshot delete', (f: BlockDevice) => deleteSnapshot(f, 'old'), true],
    ['snapshot apply', (f: BlockDevice) => applySnapshot(f, 'old'), false],
    ['amend refcount_bits=64', (f: BlockDevice) => amendImage(f, { refcountBits: 64 }), true],
    ['resize to 4 GiB (L1 moves)', (f: BlockDevice) => resizeImage(f, 4 * 1024 ** 3), true],
  ] as const)('%s', async (_name, operation, keepsData) => {
    const expected = await guestHash(MemoryBlockDevice.from(pristine), GUEST);
    let completed = false;
    for (let crashAfter = 1; !completed; crashAfter++) {
      expect(crashAfter).toBeLessThan(2000);
      const disk = MemoryBlockDevice.from(pristine);
      const faulty = new FaultInjectingBlockDevice(disk, { crashAfter, closeInner: false });
      try {
        await operation(faulty);
        await faulty.flush();
        completed = true;
      } catch (error) {
        expect(error).toMatchObject({ code: 'EIO' });
      }
      const result = await checkQcow2Image({ file: disk });
      const harmful = result.messages.filter((line) => line.startsWith('ERROR') && !BENIGN.test(line));
      expect(harmful, `crash after ${crashAfter} operations`).toEqual([]);
      expect(result.checkErrors).toBe(0);
      if (keepsData) expect(await guestHash(disk, GUEST)).toBe(expected);
      const repaired = await checkQcow2Image({ file: disk }, { repair: 'all' });
      expect(repaired.corruptions + repaired.leaks + repaired.checkErrors).toBe(0);
    }
  });

  it('resize of a 512-byte-cluster image (the refcount structures are rebuilt)', async () => {
    const path = join(dir.path, 'small-clusters.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', path, '1M']);
    run('qemu-io', ['-c', 'write -P 1 0 100k', path]);
    const bytes = readFileSync(path);
    const expected = await guestHash(MemoryBlockDevice.from(bytes), 1024 * 1024);
    let completed = false;
    for (let crashAfter = 1; !completed; crashAfter++) {
      expect(crashAfter).toBeLessThan(2000);
      const disk = MemoryBlockDevice.from(bytes);
      const faulty = new FaultInjectingBlockDevice(disk, { crashAfter, closeInner: false });
      try {
        await resizeImage(faulty, 64 * 1024 * 1024);
        completed = true;
      } catch (error) {
        expect(error).toMatchObject({ code: 'EIO' });
      }
      const result = await checkQcow2Image({ file: disk });
      expect(result.corruptions + result.checkErrors, `crash after ${crashAfter} operations`).toBe(0);
      expect(await guestHash(disk, 1024 * 1024)).toBe(expected);
    }
  });

  it('empty (after commit)', async () => {
    const base = join(dir.path, 'plain.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', base, '8M']);
    run('qemu-io', ['-c', 'write -P 1 0 100k', '-c', 'write -P 3 5M 12k', base]);
    const bytes = readFileSync(base);
    let completed = false;
    for (let crashAfter = 1; !completed; crashAfter++) {
      const disk = MemoryBlockDevice.from(bytes);
      const faulty = new FaultInjectingBlockDevice(disk, { crashAfter, closeInner: false });
      try {
        await emptyImage(faulty);
        completed = true;
      } catch (error) {
        expect(error).toMatchObject({ code: 'EIO' });
      }
      const result = await checkQcow2Image({ file: disk });
      expect(result.corruptions, `crash after ${crashAfter} operations`).toBe(0);
    }
  });
});
