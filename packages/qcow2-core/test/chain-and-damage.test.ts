/**
 * Backing chains (loops, depth limit, probing rules, resolvers), feature refusals, and damaged
 * images: each ends in a typed error, quickly.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  decodeHeader,
  peekClusterSize,
  pureCodecs,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  Qcow2Image,
} from '../src/index.js';
import { openImage } from '../src/node/index.js';
import { convertToRaw, expectSameAsRaw } from './corpus.js';
import { qemuImg, qemuIo, requireTools, tempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

/** Reads a file, lets `mutate` change it, writes it back. */
function patch(path: string, mutate: (bytes: Uint8Array, view: DataView) => void): void {
  const bytes = new Uint8Array(readFileSync(path));
  mutate(bytes, new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  writeFileSync(path, bytes);
}

function headerOf(path: string) {
  const bytes = new Uint8Array(readFileSync(path));
  return decodeHeader(bytes.subarray(0, peekClusterSize(bytes)));
}

/** Hides the backing format extension (turns it into an unknown extension type). */
function dropBackingFormat(path: string): void {
  const header = headerOf(path);
  patch(path, (_bytes, view) => {
    for (let at = header.headerLength; at < header.clusterSize - 8; ) {
      const type = view.getUint32(at);
      if (type === 0) break;
      if (type === QCOW2_EXT_MAGIC_BACKING_FORMAT) {
        view.setUint32(at, 0x7e57ab1e);
        return;
      }
      at += 8 + Math.ceil(view.getUint32(at + 4) / 8) * 8;
    }
    throw new Error('no backing format extension');
  });
}

describe.skipIf(!haveQemu)('backing chains', () => {
  let dir: { path: string; remove: () => void };
  let d: string;
  beforeAll(() => {
    dir = tempDir();
    d = dir.path;
  });
  afterAll(() => dir.remove());

  it('detects a backing loop instead of hanging', async () => {
    qemuImg(d, 'create', '-f', 'qcow2', 'loop-a.qcow2', '1M');
    qemuImg(d, 'create', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2', '1M');
    qemuImg(d, 'rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2');
    await expect(openImage(join(d, 'loop-a.qcow2'))).rejects.toMatchObject({
      code: 'EINVAL',
      message: /loop/,
    });
    // A file naming itself.
    qemuImg(d, 'create', '-f', 'qcow2', 'self.qcow2', '1M');
    qemuImg(d, 'rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', 'self.qcow2');
    await expect(openImage(join(d, 'self.qcow2'))).rejects.toMatchObject({ code: 'EINVAL', message: /loop/ });
    // Snapshots exist only in qcow2 images.
    await expect(
      openImage(join(d, 'self.qcow2'), { format: 'raw', snapshot: { name: 'x' } }),
    ).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
      message: /no internal snapshots/,
    });
  });

  it('opens 64 layers and refuses 65', async () => {
    qemuImg(d, 'create', '-f', 'qcow2', 'layer-0.qcow2', '1M');
    qemuIo(d, 'layer-0.qcow2', ['write -P 0x42 0 512']);
    for (let index = 1; index < 65; index++) {
      qemuImg(
        d,
        'create',
        '-f',
        'qcow2',
        '-u',
        '-b',
        `layer-${index - 1}.qcow2`,
        '-F',
        'qcow2',
        `layer-${index}.qcow2`,
        '1M',
      );
    }
    const opened = await openImage(join(d, 'layer-63.qcow2'));
    expect(opened.chain).toHaveLength(64);
    expect((await opened.device.read(0, 2))[0]).toBe(0x42);
    const [extent] = await opened.device.blockStatus(0, 512);
    expect(extent).toMatchObject({ depth: 63, data: true });
    await opened.close();
    await expect(openImage(join(d, 'layer-64.qcow2'))).rejects.toMatchObject({
      code: 'EINVAL',
      message: /64 layers/,
    });
  });

  it('a probed (undeclared) qcow2 backing file may not name further files', async () => {
    writeFileSync(join(d, 'secret.raw'), 'secret data');
    // A "raw disk" whose guest wrote a qcow2 header naming secret.raw.
    qemuImg(d, 'create', '-f', 'qcow2', '-u', '-b', 'secret.raw', '-F', 'raw', 'evil.img', '1M');
    qemuImg(d, 'create', '-f', 'qcow2', '-b', 'evil.img', '-F', 'qcow2', '-u', 'victim.qcow2', '1M');
    dropBackingFormat(join(d, 'victim.qcow2'));
    await expect(openImage(join(d, 'victim.qcow2'))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
      message: /probed.*declare/,
    });
    // Declared raw: the header bytes are plain data.
    qemuImg(d, 'create', '-f', 'qcow2', '-b', 'evil.img', '-F', 'raw', '-u', 'declared.qcow2', '1M');
    const opened = await openImage(join(d, 'declared.qcow2'));
    expect(opened.chain.map((layer) => layer.format)).toEqual(['qcow2', 'raw']);
    expect(Array.from(await opened.device.read(0, 4))).toEqual([0x51, 0x46, 0x49, 0xfb]);
    await opened.close();
    // A probed qcow2 backing file without files of its own is fine.
    qemuImg(d, 'create', '-f', 'qcow2', 'plain-base.qcow2', '1M');
    qemuIo(d, 'plain-base.qcow2', ['write -P 7 0 4096']);
    qemuImg(d, 'create', '-f', 'qcow2', '-b', 'plain-base.qcow2', '-F', 'qcow2', 'probing.qcow2', '1M');
    dropBackingFormat(join(d, 'probing.qcow2'));
    const probing = await openImage(join(d, 'probing.qcow2'));
    expect(probing.chain.map((layer) => layer.format)).toEqual(['qcow2', 'qcow2']);
    expect((probing.image as Qcow2Image).backingFormat).toBeUndefined();
    expect((await probing.device.read(0, 1))[0]).toBe(7);
    await probing.close();
  });

  it('needs a resolver for a backing file unless told not to open it', async () => {
    qemuImg(d, 'create', '-f', 'qcow2', 'r-base.qcow2', '1M');
    qemuIo(d, 'r-base.qcow2', ['write -P 9 0 1M']);
    qemuImg(d, 'create', '-f', 'qcow2', '-b', 'r-base.qcow2', '-F', 'qcow2', 'r-top.qcow2', '1M');
    qemuIo(d, 'r-top.qcow2', ['write -P 8 4096 4096']);
    const file = MemoryBlockDevice.from(new Uint8Array(readFileSync(join(d, 'r-top.qcow2'))));
    await expect(Qcow2Image.open(file)).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
      message: /no backing resolver/,
    });
    const alone = await Qcow2Image.open(file, { openBacking: false });
    expect(alone.backingFileName).toBe('r-base.qcow2');
    expect(alone.backingFormat).toBe('qcow2');
    // Cluster 0 was copied up by qemu-io's partial write; cluster 3 is not allocated in the top.
    expect(Array.from(await alone.read(4095, 2))).toEqual([9, 8]);
    expect(Array.from(await alone.read(200_000, 1))).toEqual([0]);
    // A resolver mapping the name to an in-memory device.
    const names: string[] = [];
    const withBacking = await Qcow2Image.open(
      MemoryBlockDevice.from(new Uint8Array(readFileSync(join(d, 'r-top.qcow2')))),
      {
        resolveBacking: async ({ name, format, depth }) => {
          names.push(`${name}:${format}:${depth}`);
          return Qcow2Image.open(MemoryBlockDevice.from(new Uint8Array(readFileSync(join(d, name)))), {
            chainDepth: depth,
          });
        },
      },
    );
    expect(names).toEqual(['r-base.qcow2:qcow2:1']);
    expect(Array.from(await withBacking.read(4095, 2))).toEqual([9, 8]);
    expect(Array.from(await withBacking.read(200_000, 1))).toEqual([9]);
    await withBacking.close();
    await alone.close();
  });

  it('resolves a relative data file name against the working directory, as QEMU does', async () => {
    mkdirSync(join(d, 'df'), { recursive: true });
    qemuImg(join(d, 'df'), 'create', '-f', 'qcow2', '-o', 'data_file=rel.data', 'img.qcow2', '1M');
    qemuIo(join(d, 'df'), 'img.qcow2', ['write -P 0x66 0 4096']);
    const previous = process.cwd();
    try {
      process.chdir(d);
      // qemu-io from the parent folder cannot find rel.data either.
      expect(() => qemuIo(d, 'df/img.qcow2', ['read 0 512'])).toThrow(/rel\.data/);
      await expect(openImage(join(d, 'df', 'img.qcow2'))).rejects.toMatchObject({ code: 'ENOENT' });
      process.chdir(join(d, 'df'));
      const opened = await openImage(join(d, 'df', 'img.qcow2'));
      expect((opened.image as Qcow2Image).dataFileName).toBe('rel.data');
      expect((await opened.device.read(0, 1))[0]).toBe(0x66);
      await opened.close();
    } finally {
      process.chdir(previous);
    }
  });

  it('reads an in-memory compressed image with the pure codecs', async () => {
    qemuImg(d, 'create', '-f', 'raw', 'pc.raw', '2M');
    qemuIo(d, 'pc.raw', ['write -P 0x5c 100000 900000'], ['-f', 'raw']);
    for (const type of ['zlib', 'zstd']) {
      qemuImg(
        d,
        'convert',
        '-c',
        '-O',
        'qcow2',
        '-o',
        `compression_type=${type}`,
        'pc.raw',
        `pc-${type}.qcow2`,
      );
      const image = await Qcow2Image.open(
        MemoryBlockDevice.from(new Uint8Array(readFileSync(join(d, `pc-${type}.qcow2`)))),
        {
          codecs: pureCodecs,
        },
      );
      expect(image.compressionType).toBe(type);
      await expectSameAsRaw(image, join(d, 'pc.raw'));
      await image.close();
    }
  });
});

describe.skipIf(!haveQemu)('feature refusals and damaged images', () => {
  let dir: { path: string; remove: () => void };
  let d: string;
  beforeAll(() => {
    dir = tempDir();
    d = dir.path;
  });
  afterAll(() => dir.remove());

  /** A fresh 4 MiB image with data, 64 KiB clusters. */
  function fresh(name: string, options: string[] = []): string {
    qemuImg(d, 'create', '-f', 'qcow2', ...options, name, '4M');
    qemuIo(d, name, ['write -P 0x33 0 200000', 'write -c -P 0x44 1048576 65536']);
    return join(d, name);
  }

  async function readAll(path: string): Promise<void> {
    const opened = await openImage(path);
    try {
      await opened.device.read(0, opened.device.size);
    } finally {
      await opened.close();
    }
  }

  it('refuses encrypted images', async () => {
    qemuImg(
      d,
      'create',
      '-f',
      'qcow2',
      '--object',
      'secret,id=sec0,data=123456',
      '-o',
      'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10',
      'enc.qcow2',
      '1M',
    );
    await expect(openImage(join(d, 'enc.qcow2'))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
      message: /encrypted images are not supported/,
    });
  });

  it('opens for writing, and refuses unknown incompatible features by name', async () => {
    const path = fresh('feat.qcow2');
    const writable = await openImage(path, { readOnly: false });
    expect(writable.device.readOnly).toBe(false);
    await writable.close();
    patch(path, (_b, view) => view.setUint32(76, view.getUint32(76) | (1 << 12)));
    await expect(openImage(path)).rejects.toMatchObject({ code: 'EUNSUPPORTED', message: /feature bit 12/ });
  });

  it('opens a corrupt-flagged image read-only', async () => {
    const path = fresh('corrupt-flag.qcow2');
    patch(path, (_b, view) => view.setUint32(76, view.getUint32(76) | 2));
    await expect(openImage(path, { readOnly: false })).rejects.toMatchObject({ code: 'ECORRUPT' });
    const opened = await openImage(path);
    expect((opened.image as Qcow2Image).corrupt).toBe(true);
    expect(opened.device.readOnly).toBe(true);
    await expect(opened.device.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EROFS' });
    await expectSameAsRaw(opened.device, convertToRaw(d, 'corrupt-flag.qcow2', 'corrupt-flag.raw', ['-U']));
    await opened.close();
  });

  it('rejects a truncated file (tables past the end)', async () => {
    const path = fresh('trunc.qcow2');
    const header = headerOf(path);
    writeFileSync(path, readFileSync(path).subarray(0, header.l1TableOffset + 4));
    await expect(openImage(path)).rejects.toMatchObject({ code: 'ECORRUPT', message: /past the end/ });
    writeFileSync(join(d, 'tiny.qcow2'), readFileSync(path).subarray(0, 40));
    await expect(openImage(join(d, 'tiny.qcow2'), { format: 'qcow2' })).rejects.toMatchObject({
      code: 'ECORRUPT',
    });
  });

  it('rejects L1 entries pointing past the end, unaligned, or with reserved bits', async () => {
    const cases: [string, number, number, RegExp][] = [
      ['l1-past-end', 0, 0x10000000, /past the end/],
      ['l1-unaligned', 0, 0x40200, /not cluster-aligned/],
      ['l1-reserved', 0x01000000, 0x40000, /reserved bits/],
    ];
    for (const [name, high, low, message] of cases) {
      const path = fresh(`${name}.qcow2`);
      const header = headerOf(path);
      patch(path, (_b, view) => {
        view.setUint32(header.l1TableOffset, high);
        view.setUint32(header.l1TableOffset + 4, low);
      });
      await expect(readAll(path), name).rejects.toMatchObject({ code: 'ECORRUPT', message });
    }
  });

  it('rejects L2 entries with reserved bits or unaligned data, and garbage compressed data', async () => {
    const path = fresh('l2.qcow2');
    const header = headerOf(path);
    const view = new DataView(readFileSync(path).buffer);
    const l2Offset = view.getUint32(header.l1TableOffset + 4) & 0xfffffe00;
    patch(path, (_b, v) => v.setUint32(l2Offset + 4, v.getUint32(l2Offset + 4) | 0x2));
    await expect(readAll(path)).rejects.toMatchObject({ code: 'ECORRUPT', message: /reserved bits/ });

    const unaligned = fresh('l2-unaligned.qcow2');
    patch(unaligned, (_b, v) => v.setUint32(l2Offset + 4, (v.getUint32(l2Offset + 4) + 0x200) >>> 0));
    await expect(readAll(unaligned)).rejects.toMatchObject({
      code: 'ECORRUPT',
      message: /not cluster-aligned/,
    });

    // The compressed cluster at guest 1 MiB is L2 entry 16: point its data at the zero-filled end
    // of the L1 cluster (valid offset, invalid deflate data).
    const garbage = fresh('l2-garbage.qcow2');
    patch(garbage, (bytes, v) => {
      const entry = l2Offset + 16 * 8;
      expect(v.getUint32(entry) & 0x40000000).not.toBe(0);
      const high = v.getUint32(entry);
      // Keep the compressed flag and sector count, replace the offset (bits 0..53 for 64 KiB).
      v.setUint32(entry, (high & 0xffc00000) >>> 0);
      v.setUint32(entry + 4, header.l1TableOffset + 512);
      bytes.fill(0xff, header.l1TableOffset + 512, header.l1TableOffset + 4096);
    });
    await expect(readAll(garbage)).rejects.toMatchObject({ code: 'ECORRUPT', message: /compressed cluster/ });
  });

  it('rejects an invalid subcluster state in extended L2', async () => {
    const path = fresh('xl2.qcow2', ['-o', 'extended_l2=on']);
    const header = headerOf(path);
    const view = new DataView(readFileSync(path).buffer);
    const l2Offset = view.getUint32(header.l1TableOffset + 4) & 0xfffffe00;
    // Entry 0 is allocated; set the zero bit of an allocated subcluster too.
    patch(path, (_b, v) => v.setUint32(l2Offset + 8, 1));
    await expect(readAll(path)).rejects.toMatchObject({ code: 'ECORRUPT', message: /subcluster 0/ });
  });

  it('rejects a snapshot table running past the end of the file', async () => {
    const path = fresh('snaps.qcow2');
    qemuImg(d, 'snapshot', '-c', 's1', 'snaps.qcow2');
    const header = headerOf(path);
    patch(path, (_b, v) => v.setUint16(header.snapshotsOffset + 14, 65535));
    await expect(openImage(path)).rejects.toMatchObject({ code: 'ECORRUPT', message: /snapshot table/ });
  });
});
