/**
 * Crash runs: a random workload (writes, partial writes, zeroes, discards, compressed writes,
 * flushes, grows) on an image over FaultInjectingBlockDevice, which loses every unflushed write at
 * a random request. Afterwards the storage is reopened: our check finds no corruption, qemu-img
 * check exits 0 or 3 (leaks at worst), every byte flushed and not touched since reads back, and the
 * image opens read-write again. QCOWKIT_SOAK=N multiplies the runs.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { type Qcow2CreateOptions, Qcow2Image } from '../src/index.js';
import { nodeCodecs } from '../src/node/index.js';
import { CrashModel, crashWorkload } from './crash-workload.js';
import { keepOpen } from './keep-open.js';
import { requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');
const SOAK = Number(process.env.QCOWKIT_SOAK ?? 1);

interface Variant {
  name: string;
  options: Omit<Qcow2CreateOptions, 'size'>;
  size: number;
  runs: number;
}

const variants: Variant[] = [
  { name: '4 KiB clusters', options: { clusterSize: 4096 }, size: 300_000, runs: 60 },
  {
    name: '512 B clusters, 64-bit refcounts',
    options: { clusterSize: 512, refcountBits: 64 },
    size: 100_000,
    runs: 60,
  },
  {
    name: 'extended L2, 1-bit refcounts',
    options: { clusterSize: 16384, extendedL2: true, refcountBits: 1 },
    size: 600_000,
    runs: 40,
  },
  { name: 'v2', options: { clusterSize: 4096, compat: '0.10' }, size: 200_000, runs: 45 },
];

describe.skipIf(!haveQemu)('qcow2 writes survive crashes', () => {
  const dir = suiteTempDir();
  let counter = 0;

  for (const variant of variants) {
    it(`${variant.name}: no corruption and every flushed byte after a crash at a random request`, async () => {
      const clusterSize = variant.options.clusterSize ?? 65536;
      await fc.assert(
        fc.asyncProperty(
          crashWorkload(variant.size, clusterSize, { compressed: true }),
          fc.integer({ min: 1, max: 300 }),
          fc.nat(),
          async (ops, crashAfter, baseSeed) => {
            const inner = new MemoryBlockDevice(0);
            const storage = keepOpen(inner);
            // A flushed starting state with data in it, so the workload overwrites and copies.
            const setup = await Qcow2Image.create(storage, {
              ...variant.options,
              size: variant.size,
              codecs: nodeCodecs,
            });
            const base = patternBytes(baseSeed, Math.floor(variant.size / 2));
            await setup.write(Math.floor(variant.size / 4), base);
            await setup.close();
            const initial = new Uint8Array(setup.size);
            initial.set(base, Math.floor(variant.size / 4));
            const expected = new CrashModel(initial);

            const fault = new FaultInjectingBlockDevice(keepOpen(inner), { crashAfter });
            let crashed = false;
            try {
              const image = await Qcow2Image.open(fault, { readOnly: false, codecs: nodeCodecs });
              for (const op of ops) await expected.apply(image, op, clusterSize);
              await image.close();
              expected.flushed();
            } catch (error) {
              if (!fault.crashed) throw error;
              crashed = true;
            }

            // After the crash: the storage as a disk would hold it.
            const reopened = await Qcow2Image.open(keepOpen(inner), { codecs: nodeCodecs });
            const ours = await reopened.check();
            expect(ours.corruptions, ours.messages.join('\n')).toBe(0);
            const content = await reopened.read(0, reopened.size);
            expected.expectFlushedBytes(content, crashed);
            await reopened.close();
            const name = join(dir.path, `crash-${counter++}.qcow2`);
            writeFileSync(name, await inner.read(0, inner.size));
            const status = spawnSync('qemu-img', ['check', name], { encoding: 'utf8' });
            expect([0, 3], status.stdout + status.stderr).toContain(status.status);
            // It opens read-write again and takes a write.
            const again = await Qcow2Image.open(keepOpen(inner), { readOnly: false, codecs: nodeCodecs });
            await again.write(0, new Uint8Array(1000).fill(7));
            await again.close();
          },
        ),
        { numRuns: variant.runs * SOAK },
      );
    }, 120_000);
  }
});
