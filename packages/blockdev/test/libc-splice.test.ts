/**
 * The libc binding's splice(2), pipe2(2) and int-valued fcntl(2), on real descriptors: bytes move
 * file -> pipe -> file at the offsets given (the files' own positions untouched), the pipe's
 * capacity can be read and changed, an empty pipe gives EAGAIN with SPLICE_F_NONBLOCK, and two
 * offsets at once are refused before any call. Linux x64/arm64 only, as the binding (CI's platform).
 */
import { randomFillSync } from 'node:crypto';
import { openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import {
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  loadLibc,
  SPLICE_F_MOVE,
  SPLICE_F_NONBLOCK,
} from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { scratchDescriptors } from './scratch-descriptors.js';

const libc = loadLibc();

const { path: scratchPath, track, pipe: newPipe } = scratchDescriptors(libc, 'qcowkit-splice-');

describe('libc splice, pipe2 and fcntl', () => {
  it('is bound on 64-bit Linux', () => {
    expect(libc).toBeDefined();
    expect(typeof libc!.splice).toBe('function');
    expect(typeof libc!.pipe).toBe('function');
    expect(typeof libc!.fcntlInt).toBe('function');
  });

  it('pipe2 gives two distinct descriptors that carry bytes; fcntl reads and sets its capacity', () => {
    const { readFd, writeFd } = newPipe();
    expect(readFd).toBeGreaterThanOrEqual(0);
    expect(writeFd).toBeGreaterThanOrEqual(0);
    expect(readFd).not.toBe(writeFd);
    const initial = libc!.fcntlInt!(writeFd, F_GETPIPE_SZ, 0);
    expect(initial).toEqual({ ok: true, value: 64 * 1024 });
    const resized = libc!.fcntlInt!(writeFd, F_SETPIPE_SZ, 256 * 1024);
    expect(resized).toEqual({ ok: true, value: 256 * 1024 });
    expect(libc!.fcntlInt!(readFd, F_GETPIPE_SZ, 0)).toEqual({ ok: true, value: 256 * 1024 });
    // An int command on a descriptor that is not a pipe fails with its errno, not a throw.
    const notPipe = libc!.fcntlInt!(track(openSync(scratchPath('plain'), 'w')), F_GETPIPE_SZ, 0);
    expect(notPipe).toMatchObject({ ok: false, code: 'EBADF' });
  });

  it('moves bytes from a file at an offset into the pipe and out to a file at an offset', () => {
    const sourceBytes = randomFillSync(Buffer.alloc(300_000));
    const sourcePath = scratchPath('source');
    const targetPath = scratchPath('target');
    writeFileSync(sourcePath, sourceBytes);
    writeFileSync(targetPath, Buffer.alloc(400_000, 0xee));
    const source = track(openSync(sourcePath, 'r'));
    const target = track(openSync(targetPath, 'r+'));
    const { readFd, writeFd } = newPipe();
    libc!.fcntlInt!(writeFd, F_SETPIPE_SZ, 1024 * 1024);
    const from = 12_345;
    const to = 70_001;
    const length = 200_000;
    let moved = 0;
    while (moved < length) {
      const into = libc!.splice!(source, from + moved, writeFd, undefined, length - moved, SPLICE_F_MOVE);
      expect(into.ok).toBe(true);
      if (!into.ok) return;
      expect(into.value).toBeGreaterThan(0);
      let left = into.value;
      while (left > 0) {
        const out = libc!.splice!(readFd, undefined, target, to + moved, left, SPLICE_F_MOVE);
        expect(out.ok).toBe(true);
        if (!out.ok) return;
        left -= out.value;
        moved += out.value;
      }
    }
    const result = readFileSync(targetPath);
    expect(result.length).toBe(400_000);
    expect(result.subarray(to, to + length).equals(sourceBytes.subarray(from, from + length))).toBe(true);
    expect(result.subarray(0, to).every((b) => b === 0xee)).toBe(true);
    expect(result.subarray(to + length).every((b) => b === 0xee)).toBe(true);
    // Neither file's own position moved: plain writes still land at 0.
    writeSync(target, Buffer.from('at zero'));
    expect(readFileSync(targetPath).subarray(0, 7).toString()).toBe('at zero');
  });

  it('returns 0 at the end of the input file', () => {
    const sourcePath = scratchPath('short');
    writeFileSync(sourcePath, Buffer.alloc(100, 1));
    const source = track(openSync(sourcePath, 'r'));
    const { writeFd } = newPipe();
    expect(libc!.splice!(source, 100, writeFd, undefined, 4096, 0)).toEqual({ ok: true, value: 0 });
    expect(libc!.splice!(source, 40, writeFd, undefined, 4096, 0)).toEqual({ ok: true, value: 60 });
  });

  it('an empty pipe with SPLICE_F_NONBLOCK fails with EAGAIN at once', () => {
    const target = track(openSync(scratchPath('never'), 'w'));
    const { readFd } = newPipe();
    const result = libc!.splice!(readFd, undefined, target, 0, 4096, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    expect(result).toMatchObject({ ok: false, code: 'EAGAIN' });
    if (!result.ok) expect(result.errno).toBe(11);
  });

  it('a read-only file as the output fails with EBADF, leaving the bytes in the pipe', () => {
    const path = scratchPath('read-only');
    writeFileSync(path, Buffer.alloc(8192));
    const readOnly = track(openSync(path, 'r'));
    const { readFd, writeFd } = newPipe();
    writeSync(writeFd, Buffer.alloc(1000, 7));
    expect(libc!.splice!(readFd, undefined, readOnly, 0, 1000, SPLICE_F_MOVE)).toMatchObject({
      ok: false,
      code: 'EBADF',
    });
    const left = Buffer.alloc(2000);
    const sink = track(openSync(scratchPath('drained'), 'w+'));
    expect(libc!.splice!(readFd, undefined, sink, 0, 2000, SPLICE_F_NONBLOCK)).toEqual({
      ok: true,
      value: 1000,
    });
    expect(readFileSync(scratchPath('drained')).equals(left.fill(7, 0, 1000).subarray(0, 1000))).toBe(true);
  });

  it('refuses an offset on both sides before calling', () => {
    const { readFd, writeFd } = newPipe();
    expect(() => libc!.splice!(readFd, 0, writeFd, 0, 1, 0)).toThrow(RangeError);
    // Nothing happened: the pipe is still empty.
    const sink = track(openSync(scratchPath('untouched'), 'w'));
    expect(libc!.splice!(readFd, undefined, sink, 0, 1, SPLICE_F_NONBLOCK)).toMatchObject({
      ok: false,
      code: 'EAGAIN',
    });
  });
});
