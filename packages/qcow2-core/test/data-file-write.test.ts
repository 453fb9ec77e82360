/**
 * Writing images with an external data file (incompatible bit 2), raw (autoclear bit 1,
 * data_file_raw) and not: the conformance kit read-write over memory devices (with and without a
 * backing file, extended L2), the layout QEMU expects (host offset = guest offset, COPIED, nothing
 * refcounted in the image file), a raw data file that always reads as the guest does, resize
 * truncating the data file, refusals (compressed clusters, no or read-only data file), and crash
 * runs where the image file and the data file lose their unflushed writes together (our check and
 * qemu-img check find no corruption, every flushed byte reads back).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describeBlockDeviceConformance, patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  classifyL2Entry,
  decodeL2Entry,
  QCOW_OFLAG_COPIED_HIGH,
  type Qcow2CreateOptions,
  Qcow2Image,
} from '../src/index.js';
import { CrashModel, crashWorkload } from './crash-workload.js';
import { keepOpen } from './keep-open.js';
import { requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');

const RUNS = 6 * Number(process.env.QCOWKIT_SOAK ?? 1);

/** The data file of each image the kit made, to reopen both together. */
const storages = new WeakMap<BlockDevice, { file: BlockDevice; data: BlockDevice }>();

async function createWithDataFile(
  size: number,
  options: Omit<Qcow2CreateOptions, 'size' | 'dataFile'>,
  backing?: Uint8Array,
): Promise<{ image: Qcow2Image; file: BlockDevice; data: BlockDevice }> {
  const file = keepOpen(new MemoryBlockDevice(0));
  const data = keepOpen(new MemoryBlockDevice(Math.ceil(size / 512) * 512));
  const image = await Qcow2Image.create(file, {
    size,
    dataFile: 'data.raw',
    ...options,
    resolveDataFile: async () => data,
    ...(backing === undefined ? {} : { resolveBacking: async () => MemoryBlockDevice.from(backing.slice()) }),
  });
  return { image, file, data };
}

function registerConformance(name: string, options: Omit<Qcow2CreateOptions, 'size' | 'dataFile'>): void {
  describeBlockDeviceConformance({
    name: `qcow2 with a data file: ${name}`,
    sizes: [1, 4097, 197_635, 2 ** 32 + 1536],
    numRuns: RUNS,
    maxOperations: 20,
    supportsResize: true,
    timeout: 60_000,
    async create(size) {
      const { image, file, data } = await createWithDataFile(size, options);
      storages.set(image, { file, data });
      return image;
    },
    async reopen(device) {
      const { file, data } = storages.get(device)!;
      await device.close();
      const image = await Qcow2Image.open(file, { readOnly: false, resolveDataFile: async () => data });
      storages.set(image, { file, data });
      return image;
    },
  });
}

registerConformance('64 KiB clusters', {});
registerConformance('raw, 4 KiB clusters', { clusterSize: 4096, dataFileRaw: true });
registerConformance('extended L2', { clusterSize: 16384, extendedL2: true });

describeBlockDeviceConformance({
  name: 'qcow2 with a data file over a backing file',
  sizes: [4097, 197_635],
  numRuns: RUNS,
  maxOperations: 20,
  supportsResize: true,
  discardReadsZero: false,
  initialContent: (size) => patternBytes(7, size),
  async create(size) {
    const backing = patternBytes(7, Math.ceil(size / 512) * 512);
    const { image } = await createWithDataFile(
      size,
      { clusterSize: 4096, backingFile: 'backing.raw', backingFormat: 'raw' },
      backing,
    );
    return image;
  },
});

/** Every allocated L2 entry of `image` (guest cluster, decoded entry). */
async function allocatedEntries(image: Qcow2Image): Promise<[number, ReturnType<typeof decodeL2Entry>][]> {
  const out: [number, ReturnType<typeof decodeL2Entry>][] = [];
  const l1 = await image.readL1Table();
  const entrySize = image.extendedL2 ? 16 : 8;
  const perTable = image.clusterSize / entrySize;
  for (let l1Index = 0; l1Index < l1.high.length; l1Index++) {
    const l2Offset = (l1.high[l1Index]! & 0x00ffffff) * 2 ** 32 + (l1.low[l1Index]! & 0xfffffe00);
    if (l2Offset === 0) continue;
    const table = await image.readL2Table(l2Offset);
    for (let index = 0; index < perTable; index++) {
      const entry = decodeL2Entry(table, index, { extendedL2: image.extendedL2, hasDataFile: true });
      if (entry.type === 'normal' || entry.type === 'zero-alloc')
        out.push([l1Index * perTable + index, entry]);
    }
  }
  return out;
}

describe('qcow2 data file layout', () => {
  it('maps data clusters at their guest offset, COPIED, with nothing refcounted in the image file', async () => {
    const { image, file, data } = await createWithDataFile(1 << 20, { clusterSize: 4096 });
    await image.write(0, patternBytes(1, 5000));
    await image.write(300_000, patternBytes(2, 70_000));
    await image.writeZeroes(8192, 4096);
    await image.flush();
    const fileSize = file.size;
    await image.write(600_000, patternBytes(3, 100_000));
    await image.flush();
    // Data went to the data file; the image file grew by no data cluster (one L2 table at most).
    expect(file.size - fileSize).toBeLessThanOrEqual(0);
    expect(await data.read(300_000, 70_000)).toEqual(patternBytes(2, 70_000));
    expect(await data.read(0, 4096)).toEqual(patternBytes(1, 4096));
    const entries = await allocatedEntries(image);
    expect(entries.length).toBeGreaterThan(0);
    for (const [cluster, entry] of entries) {
      expect(entry.hostOffset).toBe(cluster * 4096);
      expect((entry.high & QCOW_OFLAG_COPIED_HIGH) !== 0).toBe(true);
    }
    // Guest cluster 0 at host offset 0: COPIED is what makes it allocated.
    expect(entries[0]![0]).toBe(0);
    expect(classifyL2Entry(entries[0]![1].high, entries[0]![1].low, true, false)).toBe('normal');
    const report = await image.check();
    expect(report.corruptions, report.messages.join('\n')).toBe(0);
    expect(report.leaks, report.messages.join('\n')).toBe(0);
    await image.close();
  });

  it('keeps a raw data file reading as the guest does through writes, zeroes, discards and resizes', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.tuple(
            fc.constantFrom('write', 'zero', 'discard', 'resize'),
            fc.integer({ min: 0, max: 200_000 }),
            fc.integer({ min: 1, max: 20_000 }),
            fc.nat(),
          ),
          { minLength: 1, maxLength: 15 },
        ),
        async (ops) => {
          const { image, data } = await createWithDataFile(150_000, {
            clusterSize: 4096,
            dataFileRaw: true,
          });
          for (const [kind, rawOffset, rawLength, seed] of ops) {
            const offset = Math.min(rawOffset, image.size);
            const length = Math.min(rawLength, image.size - offset);
            if (kind === 'write') await image.write(offset, patternBytes(seed, length));
            if (kind === 'zero') await image.writeZeroes(offset, length);
            if (kind === 'discard') await image.discard(offset, length);
            if (kind === 'resize') await image.resize(Math.ceil((50_000 + (seed % 200_000)) / 512) * 512);
          }
          await image.flush();
          expect(data.size).toBe(image.size);
          expect(await data.read(0, data.size)).toEqual(await image.read(0, image.size));
          const report = await image.check();
          expect(report.corruptions + report.leaks, report.messages.join('\n')).toBe(0);
          await image.close();
        },
      ),
      { numRuns: 10 },
    );
  });

  it('resize truncates the data file; a raw one gets its grown range mapped', async () => {
    for (const dataFileRaw of [false, true]) {
      const { image, data } = await createWithDataFile(64 * 1024, { clusterSize: 4096, dataFileRaw });
      await image.write(0, patternBytes(5, 64 * 1024));
      await image.resize(256 * 1024);
      expect(data.size).toBe(256 * 1024);
      const extents = await image.blockStatus(64 * 1024, 192 * 1024);
      expect(extents[0]!.data).toBe(dataFileRaw);
      await image.resize(32 * 1024);
      expect(data.size).toBe(32 * 1024);
      await image.resize(96 * 1024);
      expect(await image.read(0, 32 * 1024)).toEqual(patternBytes(5, 32 * 1024));
      expect(await image.read(32 * 1024, 64 * 1024)).toEqual(new Uint8Array(64 * 1024));
      const report = await image.check();
      expect(report.corruptions + report.leaks, report.messages.join('\n')).toBe(0);
      await image.close();
    }
  });

  it('a partial write over a zeroed cluster does not show the stale bytes left in the data file', async () => {
    const { image, data } = await createWithDataFile(64 * 1024, { clusterSize: 4096 });
    await image.write(8192, patternBytes(9, 4096));
    await image.writeZeroes(8192, 4096);
    // A data file that cannot discard keeps the old bytes: they must not come back.
    await data.write(8192, patternBytes(9, 4096));
    await image.write(8192 + 100, new Uint8Array([1, 2, 3]));
    const expected = new Uint8Array(4096);
    expected.set([1, 2, 3], 100);
    expect(await image.read(8192, 4096)).toEqual(expected);
    await image.close();
  });

  it('refuses compressed clusters, writing without the data file, and a read-only data file', async () => {
    const { image, file, data } = await createWithDataFile(64 * 1024, { clusterSize: 4096 });
    await expect(image.writeCompressed(0, new Uint8Array(4096))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
    });
    await image.close();
    await expect(Qcow2Image.open(file, { readOnly: false })).rejects.toMatchObject({ code: 'EUNSUPPORTED' });
    const readOnlyData = MemoryBlockDevice.from(await data.read(0, data.size), { readOnly: true });
    await expect(
      Qcow2Image.open(file, { readOnly: false, resolveDataFile: async () => readOnlyData }),
    ).rejects.toMatchObject({ code: 'EROFS' });
    // Without a resolver, create still makes the image (opened read-only), unless it must map
    // a raw data file.
    const plain = await Qcow2Image.create(keepOpen(new MemoryBlockDevice(0)), { size: 4096, dataFile: 'd' });
    expect(plain.readOnly).toBe(true);
    await plain.close();
    await expect(
      Qcow2Image.create(keepOpen(new MemoryBlockDevice(0)), { size: 4096, dataFile: 'd', dataFileRaw: true }),
    ).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('a data file shorter than the guest grows as it is written', async () => {
    const file = keepOpen(new MemoryBlockDevice(0));
    const data = keepOpen(new MemoryBlockDevice(0));
    const image = await Qcow2Image.create(file, {
      size: 1 << 20,
      clusterSize: 4096,
      dataFile: 'data.raw',
      resolveDataFile: async () => data,
    });
    await image.write(500_000, patternBytes(4, 3000));
    expect(data.size).toBeGreaterThanOrEqual(503_000);
    expect(await image.read(499_000, 5000)).toEqual(
      new Uint8Array([...new Uint8Array(1000), ...patternBytes(4, 3000), ...new Uint8Array(1000)]),
    );
    await image.close();
  });
});

describe.skipIf(!haveQemu)('qcow2 data file writes survive crashes', () => {
  const dir = suiteTempDir();
  let counter = 0;
  for (const dataFileRaw of [false, true]) {
    it(`${dataFileRaw ? 'raw' : 'not raw'}: no corruption, only leaks, every flushed byte after a crash`, async () => {
      const size = 200_000;
      const clusterSize = 4096;
      await fc.assert(
        fc.asyncProperty(
          crashWorkload(size, clusterSize, { compressed: false }),
          fc.integer({ min: 1, max: 300 }),
          fc.nat(),
          async (ops, crashAfter, baseSeed) => {
            const fileStorage = new MemoryBlockDevice(0);
            const dataStorage = new MemoryBlockDevice(Math.ceil(size / 512) * 512);
            const setup = await Qcow2Image.create(keepOpen(fileStorage), {
              size,
              clusterSize,
              dataFile: 'data.raw',
              dataFileRaw,
              resolveDataFile: async () => keepOpen(dataStorage),
            });
            const base = patternBytes(baseSeed, Math.floor(size / 2));
            await setup.write(Math.floor(size / 4), base);
            await setup.close();
            const initial = new Uint8Array(setup.size);
            initial.set(base, Math.floor(size / 4));
            const expected = new CrashModel(initial);

            // One power cut for both files: requests to either count, and both lose what is unflushed.
            let requests = 0;
            const faults: FaultInjectingBlockDevice[] = [];
            const failWhen = (): boolean => {
              requests++;
              if (requests <= crashAfter) return false;
              for (const fault of faults) fault.crashNow();
              return true;
            };
            const fileFault = new FaultInjectingBlockDevice(keepOpen(fileStorage), { failWhen });
            const dataFault = new FaultInjectingBlockDevice(keepOpen(dataStorage), { failWhen });
            faults.push(fileFault, dataFault);
            let crashed = false;
            try {
              const image = await Qcow2Image.open(fileFault, {
                readOnly: false,
                resolveDataFile: async () => dataFault,
              });
              for (const op of ops) await expected.apply(image, op, clusterSize);
              await image.close();
              expected.flushed();
            } catch (error) {
              if (!fileFault.crashed && !dataFault.crashed) throw error;
              crashed = true;
            }
            const reopened = await Qcow2Image.open(keepOpen(fileStorage), {
              resolveDataFile: async () => keepOpen(dataStorage),
            });
            const report = await reopened.check();
            expect(report.corruptions, report.messages.join('\n')).toBe(0);
            const content = await reopened.read(0, reopened.size);
            expected.expectFlushedBytes(content, crashed);
            await reopened.close();
            // qemu-img check: clean or leaks only (exit 0 or 3), the data file beside the image.
            const folder = join(dir.path, `crash-${counter++}`);
            mkdirSync(folder);
            writeFileSync(join(folder, 'image.qcow2'), await fileStorage.read(0, fileStorage.size));
            writeFileSync(join(folder, 'data.raw'), await dataStorage.read(0, dataStorage.size));
            const status = spawnSync('qemu-img', ['check', 'image.qcow2'], { cwd: folder, encoding: 'utf8' });
            expect([0, 3], status.stdout + status.stderr).toContain(status.status);
            rmSync(folder, { recursive: true });
            const again = await Qcow2Image.open(keepOpen(fileStorage), {
              readOnly: false,
              resolveDataFile: async () => keepOpen(dataStorage),
            });
            await again.write(0, new Uint8Array(1000).fill(7));
            await again.close();
          },
        ),
        { numRuns: 40 * Number(process.env.QCOWKIT_SOAK ?? 1) },
      );
    }, 120_000);
  }
});
