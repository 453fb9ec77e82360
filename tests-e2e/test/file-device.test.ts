/**
 * FileBlockDevice against QEMU: the conformance kit on files in a real temporary directory, block
 * status against `qemu-img map`, and locking against a running `qemu-io`.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type BlockDevice, blockStatusAll, isBlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describeBlockDeviceConformance } from '@qcowkit/blockdev/testing';
import { afterAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const dir = tempDir('qcowkit-file-e2e-');
afterAll(() => dir.remove());
let counter = 0;
const freshPath = () => join(dir.path, `disk-${counter++}.raw`);

describeBlockDeviceConformance({
  name: 'FileBlockDevice in a real directory',
  create: (size) => FileBlockDevice.create(freshPath(), size),
  reopen: async (device: BlockDevice) => {
    const path = (device as FileBlockDevice).path;
    await device.close();
    return FileBlockDevice.open(path);
  },
  createReadOnly: async (content) => {
    const path = freshPath();
    writeFileSync(path, content);
    return FileBlockDevice.open(path, { readOnly: true });
  },
  supportsResize: true,
  numRuns: 15,
});

interface Run {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

function mergeRuns(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out.at(-1);
    if (last && last.start + last.length === r.start && last.data === r.data && last.zero === r.zero) {
      last.length += r.length;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

/** Waits until some process holds an OFD lock on `path`, watching /proc/locks (probing with an
 * open of our own could take lock bytes at the moment QEMU checks them and make it give up). */
async function waitUntilLocked(path: string): Promise<void> {
  const inode = statSync(path).ino;
  for (let attempt = 0; attempt < 400; attempt++) {
    const locks = readFileSync('/proc/locks', 'utf8');
    if (locks.split('\n').some((line) => line.includes('OFDLCK') && line.includes(`:${inode} `))) return;
    await sleep(25);
  }
  throw new Error(`${path} never got locked`);
}

describe.skipIf(!haveTools)('FileBlockDevice against QEMU', () => {
  test('blockStatus matches the data and zero extents of qemu-img map', async () => {
    const path = freshPath();
    run('qemu-img', ['create', '-q', '-f', 'raw', path, '64M']);
    run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 1 1M 4k',
      '-c',
      'write -P 2 10M 100k',
      '-c',
      'write -P 3 40M 3M',
      '-c',
      'write -z 41M 1M',
      '-c',
      'write -P 4 63M 1M',
      path,
    ]);
    const theirs = mergeRuns(
      (JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'raw', path])) as Run[]).map((e) => ({
        start: e.start,
        length: e.length,
        data: e.data,
        zero: e.zero,
      })),
    );
    await using device = await FileBlockDevice.open(path, { readOnly: true });
    const extents = await blockStatusAll(device, 0, device.size);
    const ours = mergeRuns(
      extents.map((e) => ({ start: e.offset, length: e.length, data: e.data, zero: e.zero })),
    );
    expect(theirs.filter((r) => r.data).length).toBeGreaterThanOrEqual(4);
    expect(ours).toEqual(theirs);
    for (const e of extents) {
      if (e.data) expect(e.hostOffset).toBe(e.offset);
    }
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', '-f', 'raw', path])) as {
      'actual-size': number;
      'virtual-size': number;
    };
    expect(await device.allocatedBytes()).toBe(info['actual-size']);
    expect(device.size).toBe(info['virtual-size']);
  });

  test('interoperates with QEMU image locks', async () => {
    const path = freshPath();
    run('qemu-img', ['create', '-q', '-f', 'raw', path, '1M']);

    // qemu-io holds the file open for writing (and stops by itself after 5 s).
    let qemu: ChildProcess | undefined = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 5000', path], {
      stdio: 'ignore',
    });
    try {
      await waitUntilLocked(path);
      const error = await FileBlockDevice.open(path).catch((e: unknown) => e);
      expect(isBlockDeviceError(error, 'EBUSY')).toBe(true);
      expect((error as Error).message).toContain('locked by another process (opened for writing elsewhere)');
      const forced = await FileBlockDevice.open(path, { readOnly: true, forceShare: true });
      await forced.close();
    } finally {
      const exited = new Promise((resolve) => qemu?.once('exit', resolve));
      qemu.kill();
      await exited;
      qemu = undefined;
    }

    // Our writer refuses QEMU writers and plain readers of a format that denies writers, but
    // qemu-img -U still reads.
    await using writer = await FileBlockDevice.open(path);
    const refused = runStatus('qemu-io', ['-f', 'raw', '-c', 'read 0 512', path]);
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toContain('Failed to get "write" lock');
    const shared = runStatus('qemu-img', ['info', '-U', '-f', 'raw', path]);
    expect(shared.status).toBe(0);
    await writer.write(0, new Uint8Array(512).fill(7));
    await writer.flush();
    const qcow2Path = freshPath();
    run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2Path, '1M']);
    {
      // Holding a qcow2 file's bytes for writing keeps qemu-img's qcow2 driver out too.
      await using _qcow2 = await FileBlockDevice.open(qcow2Path);
      const info = runStatus('qemu-img', ['info', qcow2Path]);
      expect(info.status).not.toBe(0);
      expect(info.stderr).toContain('lock');
    }
    expect(runStatus('qemu-img', ['info', qcow2Path]).status).toBe(0);
    const readBack = runStatus('qemu-io', ['-U', '-r', '-f', 'raw', '-c', 'read -P 7 0 512', path]);
    expect(readBack.status).toBe(0);
    expect(readBack.stdout).toContain('read 512/512 bytes');
    expect(readBack.stdout).not.toContain('Pattern verification failed');
  });
});
