/**
 * The libc binding's RawIo (plain calls for a thread of its own), on real descriptors: pread and
 * pwrite at offsets (the file's position untouched), read and write on a pipe, EAGAIN as minus
 * errno on an empty non-blocking pipe, poll's ready bits and its timeout, lseek SEEK_HOLE over a
 * sparse file, sendfile into a pipe, fdatasync, close, and errors as minus errno (EBADF) with
 * their names.
 * Linux x64/arm64 only, as the binding (CI's platform).
 */
import { randomFillSync } from 'node:crypto';
import { openSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { F_DUPFD_CLOEXEC, F_GETFL, loadLibc, O_CLOEXEC, O_NONBLOCK } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { scratchDescriptors } from './scratch-descriptors.js';

const libc = loadLibc();
const io = libc?.rawIo;
const EAGAIN = 11;
const EBADF = 9;
const POLLIN = 1;
const POLLOUT = 4;

const { path: scratchPath, track, pipe } = scratchDescriptors(libc, 'qcowkit-raw-io-');

function nonBlockingPipe(): { readFd: number; writeFd: number } {
  return pipe(O_CLOEXEC | O_NONBLOCK);
}

describe.skipIf(io === undefined)('libc RawIo', () => {
  it('preads and pwrites at offsets, leaving the position alone', () => {
    const path = scratchPath('file');
    const contents = randomFillSync(Buffer.alloc(64 * 1024));
    writeFileSync(path, contents);
    const fd = track(openSync(path, 'r+'));
    const part = Buffer.alloc(1000);
    expect(io!.pread(fd, part, part.length, 5000)).toBe(1000);
    expect(part.equals(contents.subarray(5000, 6000))).toBe(true);
    // A view: the call reads into the view's own bytes.
    const whole = Buffer.alloc(3000, 0xee);
    expect(io!.pread(fd, whole.subarray(1000), 1000, 0)).toBe(1000);
    expect(whole.subarray(1000, 2000).equals(contents.subarray(0, 1000))).toBe(true);
    expect(whole[999]).toBe(0xee);
    expect(whole[2000]).toBe(0xee);
    const data = Buffer.alloc(777, 0x5a);
    expect(io!.pwrite(fd, data, data.length, 60_000)).toBe(777);
    expect(io!.fdatasync(fd)).toBe(0);
    // Past the end: 0 bytes.
    expect(io!.pread(fd, part, part.length, 1 << 20)).toBe(0);
    const first = Buffer.alloc(4);
    readSync(fd, first, 0, 4, null);
    expect(first.equals(contents.subarray(0, 4))).toBe(true);
    const after = readFileSync(path);
    expect(after.subarray(60_000, 60_777).equals(data)).toBe(true);
    expect(after.subarray(0, 60_000).equals(contents.subarray(0, 60_000))).toBe(true);
  });

  it('reads and writes a non-blocking pipe; empty gives minus EAGAIN; poll sees readiness', () => {
    const pipe = nonBlockingPipe();
    const buffer = Buffer.alloc(100);
    expect(io!.read(pipe.readFd, buffer, buffer.length)).toBe(-EAGAIN);
    // Nothing to read: poll times out (0) after about its time.
    const started = performance.now();
    expect(io!.poll(pipe.readFd, POLLIN, 30)).toBe(0);
    expect(performance.now() - started).toBeGreaterThanOrEqual(25);
    expect(io!.poll(pipe.writeFd, POLLOUT, 0) & POLLOUT).toBe(POLLOUT);
    expect(io!.write(pipe.writeFd, Buffer.from('hello'), 5)).toBe(5);
    expect(io!.poll(pipe.readFd, POLLIN, 1000) & POLLIN).toBe(POLLIN);
    expect(io!.read(pipe.readFd, buffer, buffer.length)).toBe(5);
    expect(buffer.subarray(0, 5).toString()).toBe('hello');
    const flags = libc!.fcntlInt!(pipe.readFd, F_GETFL, 0);
    expect(flags.ok && (flags.value & O_NONBLOCK) !== 0).toBe(true);
  });

  it('finds the next hole of a sparse file', () => {
    const path = scratchPath('sparse');
    const fd = track(openSync(path, 'w+'));
    writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0);
    writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 4 << 20);
    const hole = io!.seekHole(fd, 0);
    // Where holes are reported, the first ends the first block's data; else the end of file.
    expect(hole === 4096 || hole >= 4096).toBe(true);
    expect(hole).toBeLessThanOrEqual(4 << 20);
    expect(io!.seekHole(fd, 4 << 20)).toBe((4 << 20) + 4096);
  });

  it('sends a file range into a pipe by sendfile', () => {
    const path = scratchPath('send');
    const contents = randomFillSync(Buffer.alloc(8192));
    writeFileSync(path, contents);
    const fd = track(openSync(path, 'r'));
    const pipe = nonBlockingPipe();
    expect(io!.sendfile(pipe.writeFd, fd, 100, 1000)).toBe(1000);
    const out = Buffer.alloc(2000);
    expect(io!.read(pipe.readFd, out, out.length)).toBe(1000);
    expect(out.subarray(0, 1000).equals(contents.subarray(100, 1100))).toBe(true);
  });

  it('closes a duplicate, and reports a bad descriptor as minus EBADF', () => {
    const pipe = nonBlockingPipe();
    const copy = libc!.fcntlInt!(pipe.writeFd, F_DUPFD_CLOEXEC, 0);
    expect(copy.ok).toBe(true);
    if (!copy.ok) return;
    expect(io!.close(copy.value)).toBe(0);
    expect(io!.close(copy.value)).toBe(-EBADF);
    expect(io!.write(copy.value, Buffer.alloc(1), 1)).toBe(-EBADF);
    expect(io!.errnoName(EBADF)).toBe('EBADF');
    expect(io!.errnoName(28)).toBe('ENOSPC');
  });

  it("names every errno as koffi's table does (its first name for a value), common ones included", () => {
    const koffi = createRequire(import.meta.url)('koffi') as { os: { errno: Record<string, number> } };
    const first = new Map<number, string>();
    for (const [name, value] of Object.entries(koffi.os.errno)) if (!first.has(value)) first.set(value, name);
    expect(first.size).toBeGreaterThan(100);
    for (const [value, name] of first) expect(io!.errnoName(value)).toBe(name);
    expect(io!.errnoName(100_000)).toBe('errno 100000');
  });
});
