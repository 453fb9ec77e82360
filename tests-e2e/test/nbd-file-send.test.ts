/**
 * A raw export on a memory-backed file system sends its large READ replies by sendfile(2): real
 * clients (nbdcopy with 4 connections, qemu-io, qemu-img compare) must read exactly the file's
 * bytes, written ones included, over a unix socket and over loopback TCP.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, must, startServer } from '../src/nbd-server.js';
import { requireTools, run } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'nbdcopy');

describe.skipIf(!ok)('qcow2-nbd raw exports on tmpfs (READ replies by sendfile)', () => {
  let dir: string;
  let image: string;

  beforeAll(() => {
    // Memory-backed as the server's choice needs (Linux CI has /dev/shm).
    dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qcowkit-e2e-send-'));
    image = join(dir, 'disk.raw');
    run('qemu-img', ['create', '-f', 'raw', image, '48M']);
    run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 0 5M',
      '-c',
      'write -P 0xcd 9M 300k',
      '-c',
      'write -P 0x11 20M 12M',
      '-c',
      'write -P 7 49148k 4k',
      image,
    ]);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const transport of ['unix', 'tcp'] as const) {
    it(`nbdcopy (4 connections), qemu-io and qemu-img compare read the file's bytes (${transport})`, async () => {
      const port = transport === 'tcp' ? await freePort() : undefined;
      const server = await startServer(dir, ['-f', 'raw', '-t', '-e', '0', image], { port });
      try {
        const copy = join(dir, `copy-${transport}.raw`);
        await must('nbdcopy', ['--connections=4', server.uri, copy]);
        run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', copy, image]);
        rmSync(copy);
        // Written through the export, then read back in large requests.
        const io = await must('qemu-io', [
          '-f',
          'raw',
          '-c',
          'write -P 0x42 2M 3M',
          '-c',
          'read -P 0x42 2M 3M',
          '-c',
          'read -P 0xab 1M 1M',
          '-c',
          'read -P 0x11 20M 12M',
          server.uri,
        ]);
        expect(io).not.toContain('verification failed');
        expect(io.match(/^read /gm)).toHaveLength(3);
        const compare = await must('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', server.uri, image]);
        expect(compare).toContain('Images are identical');
      } finally {
        expect(await server.stop()).toBe(0);
      }
    });
  }
});
