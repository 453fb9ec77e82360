/**
 * `qcow2 check` against `qemu-img check` on the same files: the JSON fields, the human summary,
 * the finding lines on stderr and the exit code (0 clean, 2 corruptions, 3 leaks only).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { checkQcow2Image, checkResultToQemuJson } from '@qcowkit/qcow2-core';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { buildCorpus, CORPUS } from '../src/corpus.js';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

const WRITES = ['write -P 1 0 300k', 'write -c 1M 64k', 'write -z 2M 128k', 'write -P 2 5M 100k'];

/** Builds an image in `dir` and returns its file name. */
type Maker = (dir: string, name: string) => void;

const qemuIo = (dir: string, name: string, commands: readonly string[]) =>
  run('qemu-io', [...commands.flatMap((c) => ['-c', c]), name], { cwd: dir });
const create = (dir: string, name: string, options: readonly string[] = []) =>
  run('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, name, '8M'], { cwd: dir });

/** Rewrites 8 bytes at `offset(bytes)` of the file. */
function patch(dir: string, name: string, change: (bytes: Buffer) => void): void {
  const path = join(dir, name);
  const bytes = readFileSync(path);
  change(bytes);
  writeFileSync(path, bytes);
}
const firstL2 = (bytes: Buffer) =>
  Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(40))) & 0xfffffffffe00n);

const makers: [string, Maker][] = [
  [
    'clean',
    (dir, name) => {
      create(dir, name);
      qemuIo(dir, name, WRITES);
    },
  ],
  [
    'snapshots and 512-byte clusters',
    (dir, name) => {
      create(dir, name, ['-o', 'cluster_size=512']);
      qemuIo(dir, name, ['write -P 1 0 300k']);
      run('qemu-img', ['snapshot', '-c', 'one', name], { cwd: dir });
      qemuIo(dir, name, ['write -P 2 64k 64k']);
    },
  ],
  [
    'extended L2, 8-bit refcounts',
    (dir, name) => {
      create(dir, name, ['-o', 'extended_l2=on,refcount_bits=8']);
      qemuIo(dir, name, WRITES);
    },
  ],
  [
    // 17/160 = 10.625%: qemu-img's %0.2f prints 10.62 (ties to even), JS's toFixed 10.63.
    'a rounding tie in the summary',
    (dir, name) => {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', name, '10M'], { cwd: dir });
      qemuIo(dir, name, ['write 0 1M', 'write 5M 64k']);
    },
  ],
  [
    'lazy refcounts after a crash',
    (dir, name) => {
      create(dir, name, ['-o', 'lazy_refcounts=on']);
      runStatus('qemu-io', ['-c', 'write 0 256k', '-c', 'abort', name], { cwd: dir });
    },
  ],
  [
    'a leaked cluster',
    (dir, name) => {
      create(dir, name);
      qemuIo(dir, name, WRITES);
      patch(dir, name, (bytes) => bytes.writeBigUInt64BE(0n, firstL2(bytes) + 8));
    },
  ],
  [
    'an L2 entry past the end of the file',
    (dir, name) => {
      create(dir, name);
      qemuIo(dir, name, WRITES);
      patch(dir, name, (bytes) => bytes.writeBigUInt64BE((1n << 63n) | (1n << 36n), firstL2(bytes) + 8));
    },
  ],
];

describe.skipIf(!haveTools)('qcow2 check matches qemu-img check', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-check-e2e-');
  });
  afterAll(() => dir?.remove());

  test.each(makers)('%s', (label, make) => {
    const name = `${label.replace(/\W+/g, '-')}.qcow2`;
    make(dir.path, name);
    const qemuJson = runStatus('qemu-img', ['check', '--output=json', name], { cwd: dir.path });
    const oursJson = qcow2(['check', '--output=json', name], { cwd: dir.path });
    expect(JSON.parse(oursJson.stdout)).toEqual(JSON.parse(qemuJson.stdout));
    expect(oursJson.status).toBe(qemuJson.status);

    const qemuHuman = runStatus('qemu-img', ['check', name], { cwd: dir.path });
    const oursHuman = qcow2(['check', name], { cwd: dir.path });
    expect(oursHuman.stdout).toBe(qemuHuman.stdout);
    expect(oursHuman.status).toBe(qemuHuman.status);
    expect(oursHuman.stderr).toBe(qemuHuman.stderr);
  });
});

describe.skipIf(!haveTools)('qcow2 check on images qemu-img cannot open', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-check-refused-');
  });
  afterAll(() => dir?.remove());

  /** The bitmap directory's first entry, at `field` bytes into it. */
  const bitmapField = (bytes: Buffer, field: number) => {
    // The bitmaps extension (0x23852875) holds the directory offset at 16 bytes into its data.
    let at = bytes.readUInt32BE(100);
    while (bytes.readUInt32BE(at) !== 0x23852875) at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8;
    return Number(bytes.readBigUInt64BE(at + 8 + 16)) + field;
  };

  test.each([
    [
      'reserved bitmap flags',
      (bytes: Buffer) => bytes.writeUInt32BE(0x66, bitmapField(bytes, 12)),
      /reserved flags/,
    ],
    [
      'a bitmap type other than dirty tracking',
      (bytes: Buffer) => bytes.writeUInt8(7, bitmapField(bytes, 16)),
      /type 7/,
    ],
    [
      'bitmap granularity bits 40',
      (bytes: Buffer) => bytes.writeUInt8(40, bitmapField(bytes, 17)),
      /granularity bits 40/,
    ],
  ])(
    '%s: qemu-img cannot open it, ours reports a corruption (exit 2), not a clean image',
    (label, damage, message) => {
      const name = `${label.replace(/\W+/g, '-')}.qcow2`;
      create(dir.path, name);
      run('qemu-img', ['bitmap', '--add', name, 'b0'], { cwd: dir.path });
      patch(dir.path, name, damage);
      expect(runStatus('qemu-img', ['check', name], { cwd: dir.path }).status).toBe(1);
      const ours = qcow2(['check', name], { cwd: dir.path });
      expect(ours.status, ours.stderr).toBe(2);
      expect(ours.stderr).toMatch(message);
    },
  );
});

describe.skipIf(!haveTools)('checkQcow2Image on the read corpus matches qemu-img check', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-check-corpus-');
    buildCorpus(dir.path);
  });
  afterAll(() => dir?.remove());

  test.each(CORPUS.filter((image) => image.format === 'qcow2'))('$file: $about', async (image) => {
    const qemu = runStatus('qemu-img', ['check', '-U', '--output=json', image.file], { cwd: dir.path });
    // The check needs only the image file (not the backing or external data file), so it reads
    // the file device directly: data file names resolve against the cwd, as in QEMU.
    const file = await FileBlockDevice.open(join(dir.path, image.file), { readOnly: true, forceShare: true });
    try {
      const result = await checkQcow2Image({ file });
      expect(checkResultToQemuJson(result, { filename: image.file })).toEqual(JSON.parse(qemu.stdout));
      expect(result.messages).toEqual(qemu.stderr.split('\n').filter((line) => line !== ''));
    } finally {
      await file.close();
    }
  });
});
