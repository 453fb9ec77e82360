// A short tour of @qcowkit/blockdev. Run `pnpm demo` at the repository root (it builds first).
import {
  blockStatusAll,
  FaultInjectingBlockDevice,
  MemoryBlockDevice,
  OverlayBlockDevice,
} from '@qcowkit/blockdev';

const KiB = 1024;
const PiB = 2 ** 50;
const text = (s) => new TextEncoder().encode(s);
const show = (bytes) => JSON.stringify(new TextDecoder().decode(bytes).replaceAll('\0', '.'));
const units = [
  ['PiB', PiB],
  ['TiB', 2 ** 40],
  ['GiB', 2 ** 30],
  ['MiB', 2 ** 20],
  ['KiB', KiB],
];
const human = (n) => {
  const [name, unit] = units.find(([, unit]) => n >= unit) ?? ['B', 1];
  return `${Number((n / unit).toFixed(3))} ${name}`;
};
const hex = (n) => `0x${n.toString(16)}`;
const map = async (device, offset, length) => {
  console.log(`    ${'offset'.padStart(16)} ${'length'.padStart(16)}  kind  depth`);
  for (const e of await blockStatusAll(device, offset, length)) {
    const kind = e.data ? 'data' : e.present ? 'zero' : 'hole';
    console.log(`    ${hex(e.offset).padStart(16)} ${hex(e.length).padStart(16)}  ${kind}  ${e.depth}`);
  }
};

console.log('1. A 1 PiB sparse memory device');
const disk = new MemoryBlockDevice(PiB);
await disk.write(0, text('boot sector'));
await disk.write(PiB - 11, text('end of disk'));
console.log(`   size ${human(disk.size)}, memory used ${disk.allocatedBytes / KiB} KiB (two 64 KiB chunks)`);
console.log(
  `   first bytes ${show(await disk.read(0, 11))}, last bytes ${show(await disk.read(PiB - 11, 11))}`,
);
console.log('   block status of the whole device:');
await map(disk, 0, PiB);

console.log('\n2. A copy-on-write overlay on top of it (the lower device is never written)');
const overlay = new OverlayBlockDevice(disk);
await overlay.write(5, text('OVERLAY'));
await overlay.writeZeroes(128 * KiB, 64 * KiB);
console.log(
  `   overlay reads ${show(await overlay.read(0, 12))}, lower still reads ${show(await disk.read(0, 12))}`,
);
console.log('   block status of the first 256 KiB (depth 0 = overlay, depth 1 = lower device):');
await map(overlay, 0, 256 * KiB);
await overlay.commit();
console.log(`   after commit() the lower device reads ${show(await disk.read(0, 12))}`);
await overlay.close();

console.log('\n3. Fault injection: a crash loses what was not flushed');
const inner = new MemoryBlockDevice(4 * KiB);
const faulty = new FaultInjectingBlockDevice(inner);
await faulty.write(0, text('flushed'));
await faulty.flush();
await faulty.write(0, text('LOST!!!'));
faulty.crashNow();
console.log(`   after the crash the disk holds ${show(await inner.read(0, 7))}; requests now fail:`);
await faulty.read(0, 1).catch((error) => console.log(`   ${error.code}: ${error.message}`));

console.log('\n4. A raw file (@qcowkit/blockdev/node)');
try {
  const { FileBlockDevice } = await import('@qcowkit/blockdev/node');
  const { mkdtemp, rm } = await import('node:fs/promises');
  const { join } = await import('node:path');
  const { tmpdir } = await import('node:os');
  const folder = await mkdtemp(join(tmpdir(), 'qcowkit-demo-'));
  try {
    const file = await FileBlockDevice.create(join(folder, 'disk.raw'), 8 * 2 ** 30);
    await file.write(4 * 2 ** 30, text('hello from the middle'));
    console.log(`   ${file.description}: ${human(file.size)}, sparse on disk`);
    await map(file, 0, file.size);
    await file.close();
  } finally {
    await rm(folder, { recursive: true, force: true });
  }
} catch (error) {
  console.log(`   (not available yet: ${error.message})`);
}
await disk.close();
