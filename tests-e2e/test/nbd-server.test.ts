/**
 * qcow2-nbd against real NBD clients: nbdinfo, qemu-img, qemu-io, nbdcopy, fio, and raw sockets
 * behaving badly. Each test starts its own server (the built bin) and stops it.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NBD_BIN as BIN,
  fioVerify,
  freePort,
  makePki,
  must,
  runAsync,
  startServer,
} from '../src/nbd-server.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy', 'fio', 'openssl');

describe.skipIf(!ok)('qcow2-nbd with real NBD clients', () => {
  let dir: { path: string; remove: () => void };
  let image: string;

  beforeAll(() => {
    dir = tempDir('qcowkit-nbd-');
    image = join(dir.path, 'disk.raw');
    run('qemu-img', ['create', '-f', 'raw', image, '64M']);
    run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 1M 3M',
      '-c',
      'write -P 0xcd 10M 64k',
      '-c',
      'write -P 7 63M 4k',
      image,
    ]);
  });
  afterAll(() => dir.remove());

  it('nbdinfo --json describes the export truthfully (socket activation)', async () => {
    const info = JSON.parse(
      await must('nbdinfo', [
        '--json',
        '--',
        '[',
        process.execPath,
        BIN,
        '-f',
        'raw',
        '-r',
        '-D',
        'test disk',
        image,
        ']',
      ]),
    );
    const entry = info.exports[0];
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.structured).toBe(true);
    expect(entry['export-size']).toBe(64 * 1024 * 1024);
    expect(entry.description).toBe('test disk');
    expect(entry.is_read_only).toBe(true);
    expect(entry.can_trim).toBe(false);
    expect(entry.can_zero).toBe(false);
    expect(entry.can_flush).toBe(true);
    expect(entry.can_df).toBe(true);
    expect(entry.contexts).toEqual(['base:allocation']);
    expect(entry.block_size_maximum).toBe(32 * 1024 * 1024);
  });

  it('nbdinfo --map matches qemu-img map; nbdcopy works with socket activation', async () => {
    const map = await must('nbdinfo', ['--map', '--', '[', process.execPath, BIN, '-f', 'raw', image, ']']);
    const ours = map
      .trim()
      .split('\n')
      .map((line) => line.trim().split(/\s+/))
      .map(([start, length, type]) => ({
        start: Number(start),
        length: Number(length),
        data: (Number(type) & 1) === 0,
      }));
    const qemu = (
      JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'raw', image])) as {
        start: number;
        length: number;
        data: boolean;
      }[]
    ).map(({ start, length, data }) => ({ start, length, data }));
    expect(ours).toEqual(qemu);
    await must('nbdcopy', ['--', '[', process.execPath, BIN, '-f', 'raw', '-r', image, ']', 'null:']);
  });

  it('serves several named exports; --list, -A allocation depth, and qemu-img compare', async () => {
    const second = join(dir.path, 'second.raw');
    run('qemu-img', ['create', '-f', 'raw', second, '1M']);
    const server = await startServer(dir.path, [
      '-t',
      '-e',
      '0',
      '-r',
      '-A',
      '-f',
      'raw',
      '--export',
      `one=${image}`,
      '--export',
      `two=${second}`,
    ]);
    try {
      const socket = server.uri.split('socket=')[1]!;
      const list = JSON.parse(await must('nbdinfo', ['--json', '--list', server.uri]));
      expect(list.exports.map((entry: { 'export-name': string }) => entry['export-name'])).toEqual([
        'one',
        'two',
      ]);
      expect(list.exports[0].contexts).toEqual(['base:allocation', 'qemu:allocation-depth']);
      const depth = await must('nbdinfo', [
        '--map=qemu:allocation-depth',
        `nbd+unix:///one?socket=${socket}`,
      ]);
      expect(depth.trim().split('\n')[0]!.trim().split(/\s+/).slice(0, 3)).toEqual(['0', '4096', '1']);
      expect(
        (await runAsync('qemu-img', ['compare', '-f', 'raw', image, `nbd+unix:///one?socket=${socket}`]))
          .status,
      ).toBe(0);
      expect(
        (await runAsync('qemu-img', ['compare', '-f', 'raw', second, `nbd+unix:///two?socket=${socket}`]))
          .status,
      ).toBe(0);
      const missing = await runAsync('nbdinfo', [`nbd+unix:///three?socket=${socket}`]);
      expect(missing.status).not.toBe(0);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    expect(existsSync(server.uri.split('socket=')[1]!)).toBe(false);
  });

  it('qemu-io writes of every kind land as they land in a raw file', async () => {
    const served = join(dir.path, 'served.raw');
    const reference = join(dir.path, 'reference.raw');
    copyFileSync(image, served);
    copyFileSync(image, reference);
    const commands = [
      'write -P 0x11 100 5000',
      'aio_write -P 0x22 1M 64k',
      'aio_write -P 0x33 2M 65535',
      'aio_flush',
      'writev -P 0x44 3M 4k 8k 511',
      'write -f -P 0x55 5M 12345',
      'write -z 6M 1M',
      'write -z -u 10M 64k',
      'discard 1M 512k',
      'flush',
    ].flatMap((command) => ['-c', command]);
    const server = await startServer(dir.path, ['-f', 'raw', '--discard=unmap', served]);
    try {
      const output = await must('qemu-io', [
        '-f',
        'raw',
        ...commands,
        '-c',
        'read -P 0x11 100 5000',
        '-c',
        'read -P 0x55 5M 12345',
        '-c',
        'read -P 0 6M 1M',
        server.uri,
      ]);
      expect(output).not.toMatch(/Pattern verification failed|error/i);
    } finally {
      // Without -t the server stops once qemu-io has gone.
      expect(await server.stop()).toBe(0);
    }
    run('qemu-io', ['-f', 'raw', ...commands, reference]);
    expect(readFileSync(served).equals(readFileSync(reference))).toBe(true);
  });

  it('nbdcopy out and in with 4 connections, fio verifies from 4 jobs', async () => {
    const served = join(dir.path, 'copy.raw');
    copyFileSync(image, served);
    const server = await startServer(dir.path, ['-t', '-e', '4', '-f', 'raw', served]);
    try {
      const out = join(dir.path, 'out.raw');
      await must('nbdcopy', ['--connections=4', server.uri, out]);
      expect(readFileSync(out).equals(readFileSync(served))).toBe(true);
      const source = join(dir.path, 'source.raw');
      writeFileSync(source, Buffer.alloc(64 * 1024 * 1024, 0x5a));
      await must('nbdcopy', ['--connections=4', source, server.uri]);
      await must('nbdcopy', ['--connections=4', '--flush', source, server.uri]);
      expect((await runAsync('qemu-img', ['compare', '-f', 'raw', source, server.uri])).status).toBe(0);
      const fio = await fioVerify(server.uri);
      expect(fio).toMatch(/err= 0/);
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });

  it('a read-only export refuses writes; a qcow (v1) export needs -r or -s', async () => {
    const server = await startServer(dir.path, ['-r', '-f', 'raw', image]);
    try {
      const result = await runAsync('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', server.uri]);
      expect(`${result.stdout}${result.stderr}`).toMatch(
        /read-only|Operation not permitted|Permission denied/i,
      );
    } finally {
      await server.stop();
    }
    const qcow = join(dir.path, 'disk.qcow');
    run('qemu-img', ['create', '-f', 'qcow', qcow, '1M']);
    const refused = runStatus(process.execPath, [BIN, '-k', join(dir.path, 'never.sock'), qcow]);
    expect(refused.status).toBe(1);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toMatch(/^qcow2-nbd: .*qcow images are served read-only/);
    const bad = runStatus(process.execPath, [BIN, '--discard=sometimes', image]);
    expect(bad.status).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('without -t exits after the last client; --pid-file is written and removed; unix socket removed', async () => {
    const pidFile = join(dir.path, 'server.pid');
    const server = await startServer(dir.path, ['-r', '-f', 'raw', '--pid-file', pidFile, image]);
    const socket = server.uri.split('socket=')[1]!;
    expect(readFileSync(pidFile, 'utf8').trim()).toBe(String(server.child.pid));
    expect((await must('nbdinfo', ['--size', server.uri])).trim()).toBe(String(64 * 1024 * 1024));
    const code = await new Promise<number | null>((resolve) => {
      if (server.child.exitCode !== null) resolve(server.child.exitCode);
      else server.child.once('exit', (status) => resolve(status));
    });
    expect(code).toBe(0);
    expect(existsSync(pidFile)).toBe(false);
    expect(existsSync(socket)).toBe(false);
  });

  it('SIGTERM stops gracefully (exit 0); a second signal exits at once (exit 1)', async () => {
    for (const signals of [1, 2]) {
      const server = await startServer(dir.path, ['-t', '-f', 'raw', '-r', image]);
      const socketPath = server.uri.split('socket=')[1]!;
      // A client that keeps its side open after the server's FIN: the graceful stop waits for it.
      const client = connect({ path: socketPath, allowHalfOpen: true });
      client.on('error', () => {});
      for (const part of handshake()) client.write(part);
      await new Promise<void>((resolve) => {
        let received = 0;
        client.on('data', (chunk: Buffer) => {
          received += chunk.length;
          if (received >= 28) resolve(); // greeting and the EXPORT_NAME reply: in transmission
        });
      });
      const exited = new Promise<number | null>((resolve) => server.child.once('exit', resolve));
      server.child.kill('SIGTERM');
      // Signals sent back to back may merge into one: give the first time to be handled.
      if (signals === 2) setTimeout(() => server.child.kill('SIGTERM'), 300);
      expect(await exited).toBe(signals === 1 ? 0 : 1);
      client.destroy();
    }
  });

  it('bad clients get errors or a closed connection while a good client keeps working', async () => {
    const server = await startServer(dir.path, ['-t', '-e', '0', '-f', 'raw', '-r', image], {
      port: await freePort(),
    });
    try {
      const port = Number(new URL(server.uri).port);
      // Garbage instead of a handshake: closed.
      expect(await rawExchange(port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')])).toMatchObject({
        closed: true,
      });
      // Wrong request magic after a good handshake: closed.
      const badMagic = request(0, 0, 0, 4096);
      badMagic.writeUInt32BE(0x12345678, 0);
      expect(await rawExchange(port, [...handshake(), badMagic])).toMatchObject({ closed: true });
      // Read past the end, a 2 GiB read, an unknown command: EINVAL each, connection kept.
      const replies = await rawExchange(port, [
        ...handshake(),
        request(0, 1, 64 * 1024 * 1024 - 1, 2),
        request(0, 2, 0, 2 ** 31),
        request(77, 3, 0, 0),
        request(0, 4, 0, 16),
      ]);
      expect(replies.errors).toEqual([22, 22, 22, 0]);
      const info = await must('nbdinfo', ['--size', server.uri]);
      expect(info.trim()).toBe(String(64 * 1024 * 1024));
    } finally {
      await server.stop();
    }
  });

  it('TLS with generated certificates: nbds:// works, plain NBD is refused', async () => {
    const pki = join(dir.path, 'pki');
    makePki(pki);
    const port = await freePort();
    const server = await startServer(
      dir.path,
      ['-t', '-e', '0', '-r', '-f', 'raw', '--tls-creds', pki, image],
      { port },
    );
    try {
      const secure = JSON.parse(
        await must('nbdinfo', ['--json', `nbds://localhost:${port}/?tls-certificates=${pki}`]),
      );
      expect(secure.TLS).toBe(true);
      expect(secure.exports[0]['export-size']).toBe(64 * 1024 * 1024);
      const copy = join(dir.path, 'tls-copy.raw');
      await must('nbdcopy', [`nbds://localhost:${port}/?tls-certificates=${pki}`, copy]);
      expect(readFileSync(copy).equals(readFileSync(image))).toBe(true);
      expect((await runAsync('nbdinfo', [`nbd://localhost:${port}/`])).status).not.toBe(0);
    } finally {
      await server.stop();
    }
  });
});

/** Handshake bytes for a client that negotiates nothing and asks for the default export. */
function handshake(): Buffer[] {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3); // FIXED_NEWSTYLE | NO_ZEROES
  const option = Buffer.alloc(16);
  option.writeBigUInt64BE(0x49484156454f5054n, 0);
  option.writeUInt32BE(1, 8); // NBD_OPT_EXPORT_NAME, empty name
  return [flags, option];
}

function request(type: number, cookie: number, offset: number, length: number): Buffer {
  const out = Buffer.alloc(28);
  out.writeUInt32BE(0x25609513, 0);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(BigInt(cookie), 8);
  out.writeBigUInt64BE(BigInt(offset), 16);
  out.writeUInt32BE(length >>> 0, 24);
  return out;
}

/** Sends bytes, collects simple-reply error fields until the server closes or goes quiet. */
async function rawExchange(port: number, parts: Buffer[]): Promise<{ closed: boolean; errors: number[] }> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let received = Buffer.alloc(0);
    let timer: NodeJS.Timeout | undefined;
    const finish = (closed: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      // Skip the 18-byte greeting and the 10-byte EXPORT_NAME reply, then read simple replies.
      const errors: number[] = [];
      let position = Math.min(28, received.length);
      while (position + 16 <= received.length) {
        const error = received.readUInt32BE(position + 4);
        errors.push(error);
        position += 16;
        if (error === 0) position += 16; // the successful 16-byte read
      }
      resolve({ closed, errors });
    };
    socket.on('data', (chunk) => {
      received = Buffer.concat([received, chunk]);
      clearTimeout(timer);
      timer = setTimeout(() => finish(false), 500);
    });
    socket.on('close', () => finish(true));
    socket.on('error', () => {});
    socket.on('connect', () => {
      for (const part of parts) socket.write(part);
    });
  });
}
