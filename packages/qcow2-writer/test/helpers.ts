import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { pureCodecs, Qcow2Image } from '@qcowkit/qcow2-core';
import { expect } from 'vitest';

/** A sink collecting everything written, and the bytes once closed. */
export function memorySink(): { sink: (chunk: Uint8Array) => void; bytes(): Uint8Array } {
  const chunks: Uint8Array[] = [];
  return {
    sink: (chunk) => {
      chunks.push(chunk.slice());
    },
    bytes() {
      const total = chunks.reduce((sum, chunk) => sum + chunk.length, 0);
      const out = new Uint8Array(total);
      let at = 0;
      for (const chunk of chunks) {
        out.set(chunk, at);
        at += chunk.length;
      }
      return out;
    },
  };
}

/** Opens `bytes` with core's reader, checks it is clean, and returns the image (close it). */
export async function openChecked(bytes: Uint8Array, backing?: BlockDevice): Promise<Qcow2Image> {
  const image = await Qcow2Image.open(MemoryBlockDevice.from(bytes), {
    codecs: pureCodecs,
    resolveBacking: backing !== undefined ? async () => backing : undefined,
    openBacking: backing !== undefined,
  });
  const check = await image.check();
  expect({ corruptions: check.corruptions, leaks: check.leaks }).toEqual({ corruptions: 0, leaks: 0 });
  return image;
}

/** A memory device of `size` bytes with the given writes applied. */
export async function memorySource(
  size: number,
  writes: { offset: number; data: Uint8Array }[],
): Promise<MemoryBlockDevice> {
  const device = new MemoryBlockDevice(size);
  for (const { offset, data } of writes)
    await device.write(offset, data.subarray(0, Math.max(0, size - offset)));
  return device;
}

/** Expects equal bytes, reporting the first difference (large typed-array diffs are slow). */
export function expectSameBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  let first = -1;
  for (let index = 0; index < actual.length; index++) {
    if (actual[index] !== expected[index]) {
      first = index;
      break;
    }
  }
  expect(first).toBe(-1);
}
