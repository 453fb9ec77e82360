/**
 * A writable raw export on a memory-backed file system writes straight into its file: each
 * connection on a thread of its own (the default), or on the event loop with large WRITE payloads
 * spliced from the socket (`--connection-threads=0`). Real clients writing through it (qemu-io,
 * some requests in parallel, FUA, an odd offset; nbdcopy with 4 connections; fio verifying from 4
 * jobs; libnbd past the end) must leave exactly the bytes QEMU leaves writing the same to a plain
 * file, over a unix socket and over loopback TCP, both ways. Read-only (-r) and snapshot (-s)
 * exports must never write the file.
 */
import { randomFillSync } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isMemoryBacked } from '@qcowkit/blockdev/node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  exited,
  fioVerify,
  freePort,
  makePki,
  must,
  runAsync,
  runNbdsh,
  startServer,
} from '../src/nbd-server.js';
import { requireTools, run } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'nbdcopy', 'nbdsh', 'fio', 'openssl');

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** Writes of every kind the server treats apart: placed (over 64 KiB) or not, FUA, in parallel. */
const QEMU_IO_WRITES = [
  'write -P 0x11 0 1M',
  'write -f -P 0x22 3M 1M',
  // 200 KiB + 3 bytes at an odd offset.
  'write -P 0x33 4194307 204803',
  'aio_write -P 0x44 8M 1M',
  'aio_write -P 0x55 9M 2M',
  'aio_write -f -P 0x66 12M 300k',
  // At and just over the size that is placed.
  'aio_write -P 0x77 16M 64k',
  'aio_write -P 0x88 17M 65537',
  'aio_write -P 0x99 20M 8M',
  'aio_flush',
  'write -P 0xaa 63M 1M',
];

/**
 * libnbd on $URI with its own bounds checks off, so the server answers: one line per request, `ok`
 * or the errno name. $SIZE is the export's size.
 */
const NBDSH_SCRIPT = `
import errno, os
h.set_strict_mode(0)
h.connect_uri(os.environ["URI"])
size = h.get_size()
big = bytes(range(256)) * 1200
def attempt(name, offset, flags=0):
    try:
        h.pwrite(big, offset, flags)
        print(name, "ok")
    except nbd.Error as error:
        print(name, errno.errorcode.get(error.errno, error.errno))
attempt("past the end", size - 100000)
print("untouched", h.pread(100000, size - 100000) == bytes(100000))
attempt("at the end", size - len(big))
attempt("fua", 5000001, nbd.CMD_FLAG_FUA)
print("read back", h.pread(len(big), size - len(big)) == big and h.pread(len(big), 5000001) == big)
h.shutdown()
`;

function qemuIo(target: string, commands: readonly string[]): Promise<string> {
  return must('qemu-io', ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), target]);
}

describe.skipIf(!ok)('qcow2-nbd raw exports on tmpfs (WRITE payloads by splice)', () => {
  let dir: string;
  /** What QEMU leaves after QEMU_IO_WRITES on a zeroed file. */
  let reference: string;
  /** 64 MiB of random bytes for nbdcopy. */
  let source: string;

  beforeAll(async () => {
    // The server splices only into memory-backed files: the temporary folder if it is one, or
    // /dev/shm (Linux CI has it).
    const base = (await isMemoryBacked(tmpdir())) ? tmpdir() : '/dev/shm';
    dir = mkdtempSync(join(base, 'qcowkit-e2e-splice-'));
    reference = join(dir, 'reference.raw');
    run('qemu-img', ['create', '-f', 'raw', reference, String(SIZE)]);
    await qemuIo(reference, QEMU_IO_WRITES);
    source = join(dir, 'source.raw');
    writeFileSync(source, randomFillSync(Buffer.allocUnsafe(SIZE)));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('works on memory-backed files', async () => {
    expect(await isMemoryBacked(dir)).toBe(true);
  });

  for (const [transport, threads] of [
    ['unix', 'threads'],
    ['tcp', 'threads'],
    ['unix', 'event loop'],
    ['tcp', 'event loop'],
  ] as const) {
    it(`qemu-io writes leave what QEMU leaves; nbdcopy (4 connections) copies exactly (${transport}, ${threads})`, async () => {
      const image = join(dir, `export-${transport}.raw`);
      run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
      const port = transport === 'tcp' ? await freePort() : undefined;
      const flags = threads === 'threads' ? [] : ['--connection-threads=0'];
      const server = await startServer(dir, ['-f', 'raw', '-t', '-e', '0', ...flags, image], { port });
      try {
        const io = await qemuIo(server.uri, QEMU_IO_WRITES);
        expect(io).not.toMatch(/failed|error/i);
        expect(io.match(/^wrote /gm)).toHaveLength(QEMU_IO_WRITES.length - 1);
        expect(
          await must('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', server.uri, reference]),
        ).toContain('Images are identical');
        await must('nbdcopy', ['--connections=4', source, server.uri]);
      } finally {
        expect(await server.stop()).toBe(0);
      }
      expect(readFileSync(image).equals(readFileSync(source))).toBe(true);
      rmSync(image);
    });
  }

  it('fio verifies its random writes from 4 jobs, each connection on its thread', async () => {
    const image = join(dir, 'export-fio.raw');
    run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
    const server = await startServer(dir, ['-f', 'raw', '-t', '-e', '0', image]);
    try {
      const fio = await fioVerify(server.uri);
      expect(fio).toMatch(/err= 0/);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    rmSync(image);
  });

  it('SIGTERM during fio random writes on threads: a clean exit (0), the written data in the file', async () => {
    const image = join(dir, 'export-sigterm.raw');
    run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
    const server = await startServer(dir, ['-f', 'raw', '-t', '-e', '0', image]);
    const fio = runAsync('fio', [
      '--name=busy',
      '--ioengine=nbd',
      `--uri=${server.uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--numjobs=2',
      '--size=32M',
      '--offset_increment=32M',
      '--time_based',
      '--runtime=20',
    ]);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const started = Date.now();
    const code = exited(server.child);
    server.child.kill('SIGTERM');
    expect(await code).toBe(0);
    expect(Date.now() - started).toBeLessThan(5000);
    // fio lost its server mid-run: it fails, promptly.
    expect((await fio).status).not.toBe(0);
    // Its writes are in the file: random 4 KiB blocks all over it (not zero).
    const written = readFileSync(image);
    let nonZero = 0;
    for (let at = 0; at < written.length; at += 1024 * 1024) if (written[at + 100] !== 0) nonZero++;
    expect(nonZero).toBeGreaterThan(0);
    rmSync(image);
  });

  it('over TLS (no socket to splice from) payloads are written from the decrypted chunks: nbdcopy copies exactly', async () => {
    const pki = join(dir, 'pki');
    makePki(pki);
    const image = join(dir, 'export-tls.raw');
    run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
    const port = await freePort();
    const server = await startServer(dir, ['-f', 'raw', '-t', '-e', '0', '--tls-creds', pki, image], {
      port,
    });
    try {
      const uri = `nbds://localhost:${port}/?tls-certificates=${pki}`;
      await must('nbdcopy', ['--connections=4', source, uri]);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    expect(readFileSync(image).equals(readFileSync(source))).toBe(true);
    rmSync(image);
  });

  it('a write past the end fails with ENOSPC and the export goes on serving; FUA and the end work', async () => {
    const image = join(dir, 'export-nbdsh.raw');
    run('qemu-img', ['create', '-f', 'raw', image, String(SIZE)]);
    const server = await startServer(dir, ['-f', 'raw', image]);
    try {
      const result = await runNbdsh(NBDSH_SCRIPT, { URI: server.uri });
      expect(result.stderr).toBe('');
      expect(result.stdout.trim().split('\n')).toEqual([
        'past the end ENOSPC',
        'untouched True',
        'at the end ok',
        'fua ok',
        'read back True',
      ]);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const written = readFileSync(image);
    const big = Buffer.alloc(256 * 1200);
    for (let i = 0; i < big.length; i++) big[i] = i & 0xff;
    expect(written.subarray(SIZE - big.length).equals(big)).toBe(true);
    expect(written.subarray(5000001, 5000001 + big.length).equals(big)).toBe(true);
    expect(written.subarray(0, 5000001).every((b) => b === 0)).toBe(true);
    rmSync(image);
  });

  it('a read-only export (-r) refuses large writes and leaves the file alone', async () => {
    const image = join(dir, 'export-ro.raw');
    copyFileSync(source, image);
    const server = await startServer(dir, ['-f', 'raw', '-r', image]);
    try {
      const result = await runNbdsh(NBDSH_SCRIPT.replace(/^print\(.*$/gm, ''), { URI: server.uri });
      expect(result.stdout.trim().split('\n')).toEqual([
        'past the end EPERM',
        'at the end EPERM',
        'fua EPERM',
      ]);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    expect(readFileSync(image).equals(readFileSync(source))).toBe(true);
    rmSync(image);
  });

  it('a snapshot export (-s) takes large writes in memory: read back through it, the file untouched', async () => {
    const image = join(dir, 'export-snapshot.raw');
    copyFileSync(source, image);
    const server = await startServer(dir, ['-f', 'raw', '-s', image]);
    try {
      const io = await qemuIo(server.uri, [
        'write -P 0x5c 1M 3M',
        'aio_write -P 0x5d 7M 1M',
        'aio_write -P 0x5e 9M 300k',
        'aio_flush',
        'read -P 0x5c 1M 3M',
        'read -P 0x5d 7M 1M',
        'read -P 0x5e 9M 300k',
      ]);
      expect(io).not.toContain('verification failed');
      expect(io.match(/^read /gm)).toHaveLength(3);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    expect(readFileSync(image).equals(readFileSync(source))).toBe(true);
    rmSync(image);
  });
});
