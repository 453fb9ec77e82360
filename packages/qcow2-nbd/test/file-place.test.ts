/**
 * WRITE payloads placed in the export's file (NbdExport.fileSource.writes): through a whole server
 * in this process and a byte-level client. Large payloads go into the file (spliced from the
 * socket) and never through `device.write`; small ones, invalid ones and exports without `writes`
 * go the ordinary way; FUA flushes before the reply; a file that fails answers as the device
 * would; a client leaving mid-payload harms nobody.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice, loadLibc } from '@qcowkit/blockdev/node';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { createNbdServer, type NbdExport, type NbdServer, protocol as P } from '../src/index.js';
import { PLACE_MINIMUM } from '../src/server/request-reader.js';
import { wrap } from './helpers.js';
import { TestClient } from './test-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;

let dir: string;
let path: string;
let file: FileBlockDevice;
let server: NbdServer | undefined;
let socketPath: string;
/** Lengths of the writes and the number of flushes that reached the device. */
let deviceWrites: number[];
let deviceFlushes: number;
/** splice calls whose output was the export's file (socket -> pipe -> file). */
let splicedIntoFile: number;

beforeAll(() => {
  // Installed before the first connection makes the process's splicer, kept for the whole file.
  const libc = loadLibc()!;
  const splice = libc.splice!;
  vi.spyOn(libc, 'splice').mockImplementation((inFd, inOffset, outFd, outOffset, length, flags) => {
    const result = splice(inFd, inOffset, outFd, outOffset, length, flags);
    if (file !== undefined && outFd === file.fd && result.ok && result.value > 0) splicedIntoFile++;
    return result;
  });
});
afterAll(() => vi.restoreAllMocks());

beforeEach(async () => {
  dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qcowkit-nbd-place-'));
  socketPath = join(dir, 'nbd.sock');
  path = join(dir, 'disk.raw');
  writeFileSync(path, randomFillSync(Buffer.alloc(SIZE)));
  file = await FileBlockDevice.open(path, { syncIoMaxBytes: 64 * KiB });
  deviceWrites = [];
  deviceFlushes = 0;
  splicedIntoFile = 0;
});

afterEach(async () => {
  try {
    await server?.close();
    server = undefined;
    await file.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** The device, counting what reaches it. */
function counted(device: BlockDevice): BlockDevice {
  return wrap(device, {
    write: (offset, data, options) => {
      deviceWrites.push(data.length);
      return device.write(offset, data, options);
    },
    flush: () => {
      deviceFlushes++;
      return device.flush();
    },
  });
}

async function serve(entry: Partial<NbdExport>, readMode?: 'direct' | 'stream'): Promise<void> {
  server = createNbdServer({
    exports: [{ name: '', device: counted(file), fileSource: { fd: file.fd, writes: true }, ...entry }],
    ...(readMode !== undefined && { readMode }),
    // The event loop's placement (connection threads have their own tests).
    connectionThreads: false,
  });
  await server.listen({ path: socketPath });
}

/** Simple replies to `count` requests, by cookie (they may come in any order). */
async function replies(client: TestClient, count: number): Promise<Map<bigint, number>> {
  const out = new Map<bigint, number>();
  while (out.size < count) {
    const reply = await client.simpleReply();
    out.set(reply.cookie, reply.error);
  }
  return out;
}

describe('WRITE payloads placed in the file', () => {
  it('large payloads land in the file by splice, never through the device; small ones go through it', async () => {
    await serve({});
    const model = readFileSync(path);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const writes: [number, number][] = [
      [0, MiB],
      [5 * MiB + 1, 200 * KiB + 3],
      [8 * MiB, 4 * KiB],
      [9 * MiB, 64 * KiB],
      [9 * MiB + 100 * KiB, PLACE_MINIMUM],
      [10 * MiB + 7, 3 * MiB],
      [SIZE - 2 * MiB, 2 * MiB],
    ];
    const cookies: bigint[] = [];
    for (const [offset, length] of writes) {
      const data = randomFillSync(Buffer.alloc(length));
      data.copy(model, offset);
      cookies.push(client.request(P.NBD_CMD_WRITE, offset, length, { data }));
    }
    cookies.push(client.request(P.NBD_CMD_FLUSH, 0, 0));
    const answered = await replies(client, cookies.length);
    for (const cookie of cookies) expect(answered.get(cookie)).toBe(0);
    // Read back through the export, and straight from the file.
    const cookie = client.request(P.NBD_CMD_READ, 5 * MiB, 300 * KiB);
    const read = await client.simpleReply(300 * KiB);
    expect(read.cookie).toBe(cookie);
    expect(read.data.equals(model.subarray(5 * MiB, 5 * MiB + 300 * KiB))).toBe(true);
    expect(readFileSync(path).equals(model)).toBe(true);
    // Only the small ones (64 KiB and less) reached the device; the large ones were spliced.
    expect(deviceWrites.sort((a, b) => a - b)).toEqual([4 * KiB, 64 * KiB]);
    expect(splicedIntoFile).toBeGreaterThan(0);
    client.request(P.NBD_CMD_DISC, 0, 0);
    expect(await client.closed()).toBe(true);
  });

  it("read from stream chunks (readMode 'stream', as over TLS): placed from the chunks, nothing spliced", async () => {
    await serve({}, 'stream');
    const model = readFileSync(path);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const cookies: bigint[] = [];
    for (const [offset, length] of [
      [MiB + 5, 3 * MiB],
      [6 * MiB, 100 * KiB],
      [7 * MiB, 2 * KiB],
    ] as const) {
      const data = randomFillSync(Buffer.alloc(length));
      data.copy(model, offset);
      cookies.push(client.request(P.NBD_CMD_WRITE, offset, length, { data }));
    }
    const answered = await replies(client, cookies.length);
    for (const cookie of cookies) expect(answered.get(cookie)).toBe(0);
    expect(readFileSync(path).equals(model)).toBe(true);
    expect(deviceWrites).toEqual([2 * KiB]);
    expect(splicedIntoFile).toBe(0);
    client.destroy();
  });

  it('FUA flushes the device before the reply', async () => {
    await serve({});
    const client = await TestClient.connect(socketPath);
    await client.open();
    const data = randomFillSync(Buffer.alloc(500 * KiB));
    const plain = client.request(P.NBD_CMD_WRITE, 0, data.length, { data });
    expect(await client.simpleReply()).toMatchObject({ cookie: plain, error: 0 });
    expect(deviceFlushes).toBe(0);
    const fua = client.request(P.NBD_CMD_WRITE, MiB, data.length, { data, flags: P.NBD_CMD_FLAG_FUA });
    expect(await client.simpleReply()).toMatchObject({ cookie: fua, error: 0 });
    expect(deviceFlushes).toBe(1);
    expect(deviceWrites).toEqual([]);
    expect(
      readFileSync(path)
        .subarray(MiB, MiB + data.length)
        .equals(data),
    ).toBe(true);
    client.destroy();
  });

  it('a write past the end is answered ENOSPC the ordinary way; the connection goes on', async () => {
    await serve({});
    const before = readFileSync(path);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const data = Buffer.alloc(100 * KiB, 0x33);
    const past = client.request(P.NBD_CMD_WRITE, SIZE - 50 * KiB, data.length, { data });
    expect(await client.simpleReply()).toMatchObject({ cookie: past, error: P.NBD_ENOSPC });
    const good = client.request(P.NBD_CMD_WRITE, SIZE - 100 * KiB, data.length, { data });
    expect(await client.simpleReply()).toMatchObject({ cookie: good, error: 0 });
    const after = readFileSync(path);
    expect(after.length).toBe(SIZE);
    expect(after.subarray(0, SIZE - 100 * KiB).equals(before.subarray(0, SIZE - 100 * KiB))).toBe(true);
    expect(after.subarray(SIZE - 100 * KiB).every((b) => b === 0x33)).toBe(true);
    client.destroy();
  });

  it('a read-only export refuses large writes with EPERM, the file untouched (even given `writes`)', async () => {
    await serve({ readOnly: true });
    const before = readFileSync(path);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const data = Buffer.alloc(256 * KiB, 1);
    const cookie = client.request(P.NBD_CMD_WRITE, 0, data.length, { data });
    expect(await client.simpleReply()).toMatchObject({ cookie, error: P.NBD_EPERM });
    expect(readFileSync(path).equals(before)).toBe(true);
    client.destroy();
  });

  it('without `writes` large payloads go through the device', async () => {
    await serve({ fileSource: { fd: file.fd } });
    const client = await TestClient.connect(socketPath);
    await client.open();
    const data = randomFillSync(Buffer.alloc(MiB));
    const cookie = client.request(P.NBD_CMD_WRITE, 2 * MiB, data.length, { data });
    expect(await client.simpleReply()).toMatchObject({ cookie, error: 0 });
    expect(deviceWrites).toEqual([MiB]);
    expect(splicedIntoFile).toBe(0);
    expect(
      readFileSync(path)
        .subarray(2 * MiB, 3 * MiB)
        .equals(data),
    ).toBe(true);
    client.destroy();
  });

  it('a full file answers ENOSPC, as the device does, and the next requests are served', async () => {
    // /dev/full refuses every write with ENOSPC, as a full tmpfs would.
    const full = openSync('/dev/full', 'r+');
    try {
      const memory = new MemoryBlockDevice(SIZE);
      server = createNbdServer({
        exports: [{ name: '', device: memory, fileSource: { fd: full, writes: true } }],
        connectionThreads: false,
      });
      await server.listen({ path: socketPath });
      const client = await TestClient.connect(socketPath);
      await client.open();
      const large = Buffer.alloc(300 * KiB, 0x77);
      const small = Buffer.alloc(4 * KiB, 0x66);
      const first = client.request(P.NBD_CMD_WRITE, 0, large.length, { data: large });
      expect(await client.simpleReply()).toMatchObject({ cookie: first, error: P.NBD_ENOSPC });
      // The stream stayed in step: a small write after it reaches the device.
      const second = client.request(P.NBD_CMD_WRITE, MiB, small.length, { data: small });
      expect(await client.simpleReply()).toMatchObject({ cookie: second, error: 0 });
      const read = client.request(P.NBD_CMD_READ, MiB, small.length);
      const reply = await client.simpleReply(small.length);
      expect(reply).toMatchObject({ cookie: read, error: 0 });
      expect(reply.data.equals(small)).toBe(true);
      const third = client.request(P.NBD_CMD_WRITE, 2 * MiB, large.length, { data: large });
      expect(await client.simpleReply()).toMatchObject({ cookie: third, error: P.NBD_ENOSPC });
      client.request(P.NBD_CMD_DISC, 0, 0);
      expect(await client.closed()).toBe(true);
    } finally {
      await server?.close();
      server = undefined;
      closeSync(full);
    }
  });

  it('a client leaving in the middle of a placed payload leaves the server serving others', async () => {
    await serve({});
    const leaving = await TestClient.connect(socketPath);
    await leaving.open();
    const header = P.encodeRequestHeader({
      magic: P.NBD_REQUEST_MAGIC,
      flags: 0,
      type: P.NBD_CMD_WRITE,
      cookie: 1n,
      offset: 0,
      length: 8 * MiB,
    });
    await new Promise<void>((resolve) =>
      leaving.socket.write(Buffer.concat([header, Buffer.alloc(3 * MiB, 0x99)]), () => resolve()),
    );
    leaving.destroy();
    const staying = await TestClient.connect(socketPath);
    await staying.open();
    const data = randomFillSync(Buffer.alloc(2 * MiB));
    const write = staying.request(P.NBD_CMD_WRITE, 10 * MiB, data.length, { data });
    expect(await staying.simpleReply()).toMatchObject({ cookie: write, error: 0 });
    const read = staying.request(P.NBD_CMD_READ, 10 * MiB, data.length);
    const reply = await staying.simpleReply(data.length);
    expect(reply.cookie).toBe(read);
    expect(reply.data.equals(data)).toBe(true);
    staying.request(P.NBD_CMD_DISC, 0, 0);
    expect(await staying.closed()).toBe(true);
  });
});
