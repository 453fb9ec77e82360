/**
 * Helpers for the read tests: build images with qemu-img / qemu-io, compare what we read with
 * `qemu-img convert -O raw` output and our blockStatus with `qemu-img map --output=json`.
 */
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, blockStatusAll, type Extent } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { qemuImg, qemuIo } from './qemu.js';

/** A workload of unaligned writes, zero writes and discards scaled to `size`, as qemu-io commands. */
export function workload(size: number, seed: number): string[] {
  const at = (fraction: number): number => Math.floor(size * fraction);
  const commands = [
    `write -P ${0x10 + seed} ${at(0) + 1234} ${Math.min(100_001, size - 1234)}`,
    `write -P ${0x40 + seed} ${at(0.3) + 777} 70001`,
    `write -z ${at(0.3) + 20_000} 30000`,
    `write -P ${0x70 + seed} ${at(0.55)} 200000`,
    `discard ${at(0.55) + 65536} 65536`,
    `write -P ${0x90 + seed} ${size - 5000} 4999`,
  ];
  // Keep the commands that fit the image.
  return commands.filter((command) => {
    const parts = command.split(' ');
    const offset = Number(parts[parts.length - 2]);
    const length = Number(parts[parts.length - 1]);
    return offset >= 0 && length > 0 && offset + length <= size;
  });
}

export function runWorkload(dir: string, image: string, size: number, seed = 0, format = 'qcow2'): void {
  qemuIo(dir, image, workload(size, seed), ['-f', format]);
}

/** Writes `qemu-img convert -O raw` of `image` (with extra args) into dir/name and returns its path. */
export function convertToRaw(
  dir: string,
  image: string,
  name: string,
  extra: readonly string[] = [],
): string {
  qemuImg(dir, 'convert', ...extra, '-O', 'raw', image, name);
  return join(dir, name);
}

/**
 * Compares every byte of `device` with the raw file. With `sparse`, only ranges where either
 * side holds data are read (our blockStatus and the raw file's holes), for huge images.
 */
export async function expectSameAsRaw(device: BlockDevice, rawPath: string, sparse = false): Promise<void> {
  const rawSize = statSync(rawPath).size;
  if (device.size !== rawSize) throw new Error(`size ${device.size} differs from qemu-img's ${rawSize}`);
  if (!sparse) {
    const expected = readFileSync(rawPath);
    const actual = await device.read(0, device.size);
    assertEqualBytes(actual, expected, 0);
    return;
  }
  const raw = await FileBlockDevice.open(rawPath, { readOnly: true, lock: 'none' });
  try {
    const ranges = [
      ...(await blockStatusAll(device, 0, device.size)).filter((e) => !e.zero),
      ...(await blockStatusAll(raw, 0, raw.size)).filter((e) => !e.zero),
    ]
      .map((e) => [e.offset, e.offset + e.length] as const)
      .sort((a, b) => a[0] - b[0]);
    for (const [start, end] of ranges) {
      for (let offset = start; offset < end; offset += 4 << 20) {
        const length = Math.min(4 << 20, end - offset);
        assertEqualBytes(await device.read(offset, length), await raw.read(offset, length), offset);
      }
    }
  } finally {
    await raw.close();
  }
}

function assertEqualBytes(actual: Uint8Array, expected: Uint8Array, base: number): void {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  for (let index = 0; index < actual.length; index++) {
    if (actual[index] !== expected[index]) {
      throw new Error(
        `byte at guest offset ${base + index} is ${actual[index]}, qemu-img reads ${expected[index]}`,
      );
    }
  }
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function mergeMap(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const entry of entries) {
    const last = out[out.length - 1];
    if (
      last !== undefined &&
      last.start + last.length === entry.start &&
      last.depth === entry.depth &&
      last.present === entry.present &&
      last.zero === entry.zero &&
      last.data === entry.data &&
      (last.offset === undefined
        ? entry.offset === undefined
        : entry.offset !== undefined && last.offset + last.length === entry.offset)
    ) {
      last.length += entry.length;
    } else {
      out.push({ ...entry });
    }
  }
  return out;
}

/** qemu-img map --output=json of the image, merged. */
export function qemuMap(dir: string, image: string, extra: readonly string[] = []): MapEntry[] {
  return mergeMap(JSON.parse(qemuImg(dir, 'map', '--output=json', ...extra, image)) as MapEntry[]);
}

/** Our blockStatus in qemu-img map's shape, merged the same way. */
export async function ourMap(device: BlockDevice): Promise<MapEntry[]> {
  const extents: Extent[] = await blockStatusAll(device, 0, device.size);
  return mergeMap(
    extents.map((e) => ({
      start: e.offset,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.zero,
      data: e.data,
      ...(e.hostOffset !== undefined ? { offset: e.hostOffset } : {}),
    })),
  );
}
