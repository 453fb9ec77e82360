/**
 * The write path against an in-memory model: fast-check runs of random writes, zeroes, discards,
 * compressed writes, flushes, reopens and grows on images across the option matrix (cluster
 * sizes, refcount widths, extended L2, v2, lazy refcounts, a backing file). Every run ends with our
 * check clean, `qemu-img check` clean and `qemu-img compare` equal to a raw file of the model.
 * QCOWKIT_SOAK=N multiplies the runs.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { type Qcow2CreateOptions, Qcow2Image } from '../src/index.js';
import { nodeCodecs } from '../src/node/index.js';
import { keepOpen } from './keep-open.js';
import { qemuImg, requireTools, run, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');
const SOAK = Number(process.env.QCOWKIT_SOAK ?? 1);

type Op =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'zero'; offset: number; length: number; mayUnmap: boolean }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'compressed'; cluster: number; seed: number }
  | { kind: 'flush' }
  | { kind: 'reopen' }
  | { kind: 'grow'; by: number };

function opsArbitrary(size: number, clusterSize: number): fc.Arbitrary<Op[]> {
  const range = fc
    .tuple(
      fc.integer({ min: 0, max: size - 1 }),
      fc.oneof(fc.integer({ min: 1, max: 3 * clusterSize }), fc.integer({ min: 1, max: 4096 })),
    )
    .map(([offset, length]) => ({ offset, length: Math.min(length, size - offset) }));
  const aligned = fc
    .tuple(fc.integer({ min: 0, max: Math.floor(size / clusterSize) - 1 }), fc.integer({ min: 1, max: 4 }))
    .map(([cluster, count]) => ({
      offset: cluster * clusterSize,
      length: Math.min(count * clusterSize, size - cluster * clusterSize),
    }));
  const anyRange = fc.oneof(range, aligned);
  return fc.array(
    fc.oneof(
      {
        weight: 5,
        arbitrary: fc.tuple(anyRange, fc.nat()).map(([r, seed]) => ({ kind: 'write' as const, ...r, seed })),
      },
      {
        weight: 2,
        arbitrary: fc
          .tuple(anyRange, fc.boolean())
          .map(([r, mayUnmap]) => ({ kind: 'zero' as const, ...r, mayUnmap })),
      },
      { weight: 2, arbitrary: anyRange.map((r) => ({ kind: 'discard' as const, ...r })) },
      {
        weight: 1,
        arbitrary: fc
          .tuple(fc.integer({ min: 0, max: Math.floor(size / clusterSize) - 1 }), fc.nat())
          .map(([cluster, seed]) => ({ kind: 'compressed' as const, cluster, seed })),
      },
      { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
      { weight: 1, arbitrary: fc.constant({ kind: 'reopen' as const }) },
      {
        weight: 1,
        arbitrary: fc.integer({ min: 1, max: 3 * clusterSize }).map((by) => ({ kind: 'grow' as const, by })),
      },
    ),
    { minLength: 1, maxLength: 25 },
  );
}

/** Compressible cluster content. */
function compressible(seed: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  const pattern = patternBytes(seed, 64);
  for (let at = 0; at < length; at += 128) bytes.set(pattern.subarray(0, Math.min(64, length - at)), at);
  return bytes;
}

interface Variant {
  name: string;
  options: Omit<Qcow2CreateOptions, 'size'>;
  size: number;
  backing?: boolean;
}

const variants: Variant[] = [
  { name: '64 KiB clusters', options: {}, size: 3 << 20 },
  { name: '512 B clusters, 1-bit refcounts', options: { clusterSize: 512, refcountBits: 1 }, size: 300_000 },
  { name: '4 KiB clusters, 2-bit refcounts', options: { clusterSize: 4096, refcountBits: 2 }, size: 1 << 20 },
  {
    name: '4 KiB clusters, 8-bit refcounts, lazy',
    options: { clusterSize: 4096, refcountBits: 8, lazyRefcounts: true },
    size: 777_777,
  },
  {
    name: '512 B clusters, 64-bit refcounts',
    options: { clusterSize: 512, refcountBits: 64 },
    size: 200_000,
  },
  { name: 'v2 4 KiB clusters', options: { clusterSize: 4096, compat: '0.10' }, size: 1 << 20 },
  { name: 'extended L2 32 KiB clusters', options: { clusterSize: 32768, extendedL2: true }, size: 2 << 20 },
  { name: '2 MiB clusters', options: { clusterSize: 2 << 20 }, size: 7 << 20 },
  { name: '16 KiB clusters, zstd', options: { clusterSize: 16384, compressionType: 'zstd' }, size: 1 << 20 },
  { name: '4 KiB over a backing file', options: { clusterSize: 4096 }, size: 1 << 20, backing: true },
  {
    name: 'v2 over a backing file',
    options: { clusterSize: 4096, compat: '0.10' },
    size: 1 << 20,
    backing: true,
  },
  {
    name: 'extended L2 over a backing file',
    options: { clusterSize: 16384, extendedL2: true },
    size: 1 << 20,
    backing: true,
  },
];

describe.skipIf(!haveQemu)('qcow2 write path vs a model', () => {
  const dir = suiteTempDir();
  let counter = 0;

  for (const variant of variants) {
    it(`${variant.name}: random operations, then our check, qemu-img check and compare`, async () => {
      await fc.assert(
        fc.asyncProperty(opsArbitrary(variant.size, variant.options.clusterSize ?? 65536), async (ops) => {
          const id = counter++;
          const backingContent = variant.backing ? patternBytes(id + 1000, variant.size) : undefined;
          const backingName = `backing-${id}.raw`;
          if (backingContent) writeFileSync(join(dir.path, backingName), backingContent);
          const openOptions = {
            codecs: nodeCodecs,
            ...(backingContent
              ? {
                  resolveBacking: async () => MemoryBlockDevice.from(backingContent.slice()),
                }
              : {}),
          };
          // The storage survives close (its close only flushes), so the image can be reopened.
          const keep = keepOpen(new MemoryBlockDevice(0));
          let image: Qcow2Image = await Qcow2Image.create(keep, {
            ...variant.options,
            size: variant.size,
            ...(backingContent ? { backingFile: backingName, backingFormat: 'raw' } : {}),
            ...openOptions,
          });
          let model = new Uint8Array(image.size);
          if (backingContent) model.set(backingContent.subarray(0, model.length));
          const reopen = async (): Promise<void> => {
            await image.close();
            image = await Qcow2Image.open(keep, { ...openOptions, readOnly: false });
          };
          image = await reopenFirst(image, keep, openOptions);
          for (const op of ops) {
            const clamp = (offset: number, length: number): [number, number] => {
              const at = Math.min(offset, image.size);
              return [at, Math.min(length, image.size - at)];
            };
            switch (op.kind) {
              case 'write': {
                const [at, length] = clamp(op.offset, op.length);
                const data = patternBytes(op.seed, length);
                await image.write(at, data);
                model.set(data, at);
                break;
              }
              case 'zero': {
                const [at, length] = clamp(op.offset, op.length);
                await image.writeZeroes(at, length, { mayUnmap: op.mayUnmap });
                model.fill(0, at, at + length);
                break;
              }
              case 'discard': {
                const [at, length] = clamp(op.offset, op.length);
                await image.discard(at, length);
                if (!backingContent) {
                  model.fill(0, at, at + length);
                } else {
                  // Whole clusters read as zeros on v3 (QEMU sets the zero flag) and show the backing
                  // file again on v2; partial ones keep their bytes.
                  const cs = image.clusterSize;
                  const end = at + length;
                  const from = Math.ceil(at / cs) * cs;
                  let to = Math.floor(end / cs) * cs;
                  if (end === image.size) to = end;
                  for (let p = from; p < to; p++)
                    model[p] = image.version === 3 ? 0 : (backingContent[p] ?? 0);
                }
                break;
              }
              case 'compressed': {
                const at = op.cluster * image.clusterSize;
                if (at >= image.size) break;
                const length = Math.min(image.clusterSize, image.size - at);
                const data = compressible(op.seed, length);
                await image.writeCompressed(at, data);
                model.set(data, at);
                break;
              }
              case 'flush':
                await image.flush();
                break;
              case 'reopen':
                await reopen();
                break;
              case 'grow': {
                const newSize = image.size + op.by;
                await image.resize(newSize);
                const grown = new Uint8Array(newSize);
                grown.set(model);
                model = grown;
                break;
              }
            }
          }
          const content = await image.read(0, image.size);
          expect(equalBytes(content, model)).toBe(true);
          const ours = await image.check();
          expect(ours.corruptions, ours.messages.join('\n')).toBe(0);
          expect(ours.leaks, ours.messages.join('\n')).toBe(0);
          await image.close();
          const imageName = `img-${id}.qcow2`;
          const rawName = `img-${id}.raw`;
          writeFileSync(join(dir.path, imageName), (await keep.read(0, keep.size)) as Uint8Array);
          writeFileSync(join(dir.path, rawName), model);
          expect(run('qemu-img', ['check', imageName], dir.path)).toContain('No errors were found');
          qemuImg(dir.path, 'compare', '-f', 'qcow2', '-F', 'raw', imageName, rawName);
        }),
        { numRuns: 6 * SOAK },
      );
    }, 120_000);
  }
});

/** The image from `create` reopened read-write over `keep` (exercises open as well). */
async function reopenFirst(
  image: Qcow2Image,
  keep: BlockDevice,
  openOptions: Parameters<typeof Qcow2Image.open>[1],
): Promise<Qcow2Image> {
  await image.close();
  return Qcow2Image.open(keep, { ...openOptions, readOnly: false });
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let index = 0; index < a.length; index++) if (a[index] !== b[index]) return false;
  return true;
}
