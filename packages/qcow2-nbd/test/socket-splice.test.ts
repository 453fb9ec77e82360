/**
 * The socket splicer (socket-splice.ts) over real sockets made in this process: a server socket
 * that Node does not read (pauseOnConnect), a client writing to it. Bytes land at the file offset
 * asked for; a socket holding less than asked stops with 'again' after what it had; a file that
 * refuses the bytes stops with 'file' after consuming them, so the stream stays in step.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openSocketSplicer, type SocketSplicer } from '../src/server/socket-splice.js';

const FILE_SIZE = 4 * 1024 * 1024;

let dir: string;
let server: Server;
let client: Socket;
let accepted: Socket;
let socketFd: number;
let filePath: string;
let fileFd: number;
let splicer: SocketSplicer;

/** A connected pair: over a unix socket in `dir`, or loopback TCP. */
async function connectPair(transport: 'unix' | 'tcp'): Promise<void> {
  server = createServer({ pauseOnConnect: true });
  const acceptedNow = new Promise<Socket>((resolve) => server.once('connection', resolve));
  await new Promise<void>((resolve) => {
    if (transport === 'unix') server.listen(join(dir, 'splice.sock'), resolve);
    else server.listen(0, '127.0.0.1', resolve);
  });
  const address = server.address();
  client = await new Promise<Socket>((resolve, reject) => {
    const socket =
      typeof address === 'string'
        ? connect(address, () => resolve(socket))
        : connect(address!.port, '127.0.0.1', () => resolve(socket));
    socket.once('error', reject);
  });
  accepted = await acceptedNow;
  const fd = (accepted as unknown as { _handle: { fd: number } })._handle.fd;
  expect(fd).toBeGreaterThanOrEqual(0);
  socketFd = fd;
}

/** Sends `bytes` and waits until they have been handed to the kernel. */
function send(bytes: Buffer): Promise<void> {
  return new Promise((resolve, reject) =>
    client.write(bytes, (error) => (error ? reject(error) : resolve())),
  );
}

/** Moves `length` bytes, waiting for the socket between tries (the peer may still be sending). */
async function moveAll(offset: number, length: number): Promise<number> {
  let taken = 0;
  for (let tries = 0; taken < length; tries++) {
    const result = splicer.move(socketFd, fileFd, offset + taken, length - taken);
    expect(result.stopped).not.toBe('file');
    taken += result.taken;
    if (result.stopped === 'again') {
      if (tries > 5000) throw new Error(`only ${taken} of ${length} bytes arrived`);
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }
  return taken;
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-splice-'));
  filePath = join(dir, 'disk.raw');
  writeFileSync(filePath, Buffer.alloc(FILE_SIZE, 0xee));
  fileFd = openSync(filePath, 'r+');
  const made = openSocketSplicer();
  expect(made).toBeDefined();
  splicer = made!;
});

afterEach(async () => {
  client?.destroy();
  accepted?.destroy();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  closeSync(fileFd);
  rmSync(dir, { recursive: true, force: true });
});

describe('socket splicer', () => {
  it('is made once per process', () => {
    expect(openSocketSplicer()).toBe(splicer);
  });

  for (const transport of ['unix', 'tcp'] as const) {
    it(`moves the socket's bytes into the file at the offset (${transport})`, async () => {
      await connectPair(transport);
      // More than the pipe holds and than a socket buffer holds: sent while being moved.
      const payload = randomFillSync(Buffer.alloc(3 * 1024 * 1024 + 5));
      const offset = 123_457;
      const sending = send(payload);
      expect(await moveAll(offset, payload.length)).toBe(payload.length);
      await sending;
      const file = readFileSync(filePath);
      expect(file.length).toBe(FILE_SIZE);
      expect(file.subarray(offset, offset + payload.length).equals(payload)).toBe(true);
      expect(file.subarray(0, offset).every((b) => b === 0xee)).toBe(true);
      expect(file.subarray(offset + payload.length).every((b) => b === 0xee)).toBe(true);
    });
  }

  it("stops with 'again' after what the socket holds, then goes on where it stopped", async () => {
    await connectPair('unix');
    const payload = randomFillSync(Buffer.alloc(100_000));
    await send(payload.subarray(0, 30_000));
    const first = splicer.move(socketFd, fileFd, 1000, payload.length);
    expect(first).toEqual({ taken: 30_000, stopped: 'again' });
    // Nothing at all in the socket now.
    expect(splicer.move(socketFd, fileFd, 31_000, 70_000)).toEqual({ taken: 0, stopped: 'again' });
    await send(payload.subarray(30_000));
    expect(splicer.move(socketFd, fileFd, 31_000, 70_000)).toEqual({ taken: 70_000, stopped: 'done' });
    expect(readFileSync(filePath).subarray(1000, 101_000).equals(payload)).toBe(true);
  });

  it('takes no more than asked: the next bytes stay in the socket', async () => {
    await connectPair('unix');
    const payload = randomFillSync(Buffer.alloc(50_000));
    await send(payload);
    expect(splicer.move(socketFd, fileFd, 0, 20_000)).toEqual({ taken: 20_000, stopped: 'done' });
    expect(splicer.move(socketFd, fileFd, 500_000, 30_000)).toEqual({ taken: 30_000, stopped: 'done' });
    const file = readFileSync(filePath);
    expect(file.subarray(0, 20_000).equals(payload.subarray(0, 20_000))).toBe(true);
    expect(file.subarray(500_000, 530_000).equals(payload.subarray(20_000))).toBe(true);
    expect(file.subarray(20_000, 500_000).every((b) => b === 0xee)).toBe(true);
  });

  it("a file that refuses the bytes stops with 'file': they are consumed, the stream stays in step", async () => {
    await connectPair('unix');
    const readOnlyFd = openSync(filePath, 'r');
    try {
      const refused = randomFillSync(Buffer.alloc(40_000));
      const after = randomFillSync(Buffer.alloc(10_000));
      await send(refused);
      const result = splicer.move(socketFd, readOnlyFd, 0, refused.length);
      expect(result.stopped).toBe('file');
      expect(result.errno).toBe('EBADF');
      expect(result.taken).toBeGreaterThan(0);
      expect(result.taken).toBeLessThanOrEqual(refused.length);
      // Whatever the failed move left of the refused bytes is still in the socket; then `after`.
      await moveAll(2_000_000, refused.length - result.taken);
      await send(after);
      expect(await moveAll(3_000_000, after.length)).toBe(after.length);
      const file = readFileSync(filePath);
      expect(file.subarray(3_000_000, 3_010_000).equals(after)).toBe(true);
      expect(
        file
          .subarray(2_000_000, 2_000_000 + refused.length - result.taken)
          .equals(refused.subarray(result.taken)),
      ).toBe(true);
      // Nothing reached the file through the read-only descriptor, and the pipe was emptied: a
      // move now finds nothing left over from the failure.
      expect(file.subarray(0, 2_000_000).every((b) => b === 0xee)).toBe(true);
      expect(splicer.move(socketFd, fileFd, 0, 1)).toEqual({ taken: 0, stopped: 'again' });
    } finally {
      closeSync(readOnlyFd);
    }
  });

  it("a peer that has left gives 'again' with nothing taken (the socket's own read sees the end)", async () => {
    await connectPair('unix');
    await send(Buffer.alloc(1000, 1));
    client.end();
    await new Promise((resolve) => client.once('finish', resolve));
    expect(splicer.move(socketFd, fileFd, 0, 5000)).toEqual({ taken: 1000, stopped: 'again' });
    expect(splicer.move(socketFd, fileFd, 1000, 5000)).toEqual({ taken: 0, stopped: 'again' });
    expect(
      readFileSync(filePath)
        .subarray(0, 1000)
        .every((b) => b === 1),
    ).toBe(true);
  });
});
