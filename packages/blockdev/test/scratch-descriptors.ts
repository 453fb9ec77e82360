/**
 * What the libc binding's tests share: a scratch folder for the suite (`path(name)`), descriptors
 * closed after each test (`track`), and pipes made through the binding itself (tracked too).
 * Call at the top of a test file: it registers the hooks.
 */
import { closeSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Libc, O_CLOEXEC } from '@qcowkit/blockdev/node';
import { afterAll, afterEach, beforeAll } from 'vitest';

export interface ScratchDescriptors {
  /** `name` inside the suite's scratch folder. */
  path(name: string): string;
  /** `fd`, closed after the test. */
  track(fd: number): number;
  /** A pipe2(2) with `flags` (default O_CLOEXEC), both ends tracked. */
  pipe(flags?: number): { readFd: number; writeFd: number };
}

export function scratchDescriptors(libc: Libc | undefined, prefix: string): ScratchDescriptors {
  let dir = '';
  let opened: number[] = [];
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), prefix));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  afterEach(() => {
    for (const fd of opened) closeSync(fd);
    opened = [];
  });
  const track = (fd: number): number => {
    opened.push(fd);
    return fd;
  };
  return {
    path: (name) => join(dir, name),
    track,
    pipe(flags = O_CLOEXEC) {
      const pipe = libc!.pipe!(flags);
      if (!pipe.ok) throw new Error(`pipe2: ${pipe.code}`);
      track(pipe.readFd);
      track(pipe.writeFd);
      return pipe;
    },
  };
}
