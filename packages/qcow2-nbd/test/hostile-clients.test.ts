/**
 * The server against clients and devices that misbehave: failures must not hand a buffer still in
 * use to another request, memory per connection stays bounded (replies queued for the socket,
 * error replies and option replies included), requests left over from a client that is gone are
 * dropped, and a connection ends cleanly, within a bounded time on a graceful stop.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createNbdServer, type NbdExport, type NbdServer, protocol as P } from '../src/index.js';
import { ConnectionIo } from '../src/server/connection-io.js';
import { HANDSHAKE_PENDING_MAX } from '../src/server/handshake.js';
import { MAX_IN_FLIGHT_REQUESTS } from '../src/server/transmission.js';
import { wrap } from './helpers.js';
import { infoPayload, TestClient } from './test-client.js';

const SIZE = 1024 * 1024;
let dir: string;
let server: NbdServer | undefined;
let socketPath: string;
let device: MemoryBlockDevice;

async function start(exports: NbdExport[], extra: Partial<Parameters<typeof createNbdServer>[0]> = {}) {
  server = createNbdServer({ exports, ...extra });
  await server.listen({ path: socketPath });
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-hostile-'));
  socketPath = join(dir, 'nbd.sock');
  device = new MemoryBlockDevice(SIZE);
});

afterEach(async () => {
  vi.restoreAllMocks();
  await server?.close();
  server = undefined;
  rmSync(dir, { recursive: true, force: true });
});

/**
 * Counts the replies the server queues for its sockets and the most bytes queued at once, seen
 * after each one (`ConnectionIo.send` spied on; the afterEach hook restores it).
 */
function watchQueuedReplies(): { readonly replies: number; readonly mostPending: number; reset(): void } {
  const state = { replies: 0, mostPending: 0 };
  const send = ConnectionIo.prototype.send;
  vi.spyOn(ConnectionIo.prototype, 'send').mockImplementation(function (this: ConnectionIo, ...args) {
    send.apply(this, args);
    state.replies++;
    state.mostPending = Math.max(state.mostPending, this.pendingBytes);
  });
  return {
    get replies() {
      return state.replies;
    },
    get mostPending() {
      return state.mostPending;
    },
    reset() {
      state.replies = 0;
      state.mostPending = 0;
    },
  };
}

describe('buffers after a device failure', () => {
  it('never hands a failed write payload or read buffer to another request', async () => {
    // The device rejects at once but keeps the buffers, as a device whose parallel parts are
    // still running when one of them fails.
    const kept: ArrayBufferLike[] = [];
    let failReads = true;
    const failing = wrap(device, {
      write: (_offset: number, data: Uint8Array) => {
        kept.push(data.buffer);
        return Promise.reject(new Error('write failed half-way'));
      },
      readInto: (buffer: Uint8Array, offset: number) => {
        kept.push(buffer.buffer);
        return failReads
          ? Promise.reject(new Error('read failed half-way'))
          : device.readInto(buffer, offset);
      },
    });
    await start([{ name: '', device: failing }]);
    const client = await TestClient.connect(socketPath);
    await client.open();
    // A 64 KiB + 16 byte payload is the size of a 64 KiB READ's simple reply buffer.
    const length = 65536;
    client.request(P.NBD_CMD_WRITE, 0, length + 16, { data: Buffer.alloc(length + 16, 1) });
    expect((await client.simpleReply()).error).toBe(P.NBD_EIO);
    client.request(P.NBD_CMD_READ, 0, length);
    expect((await client.simpleReply()).error).toBe(P.NBD_EIO);
    failReads = false;
    client.request(P.NBD_CMD_READ, 0, length);
    expect((await client.simpleReply(length)).error).toBe(0);
    expect(kept).toHaveLength(3);
    expect(new Set(kept).size).toBe(3);
    client.destroy();
  });
});

/** Waits until `value()` stops changing (the server has done all it will do for now). */
async function settled(value: () => number, interval = 20): Promise<number> {
  let last = -1;
  let steady = 0;
  while (steady < 3) {
    await new Promise((resolve) => setTimeout(resolve, interval));
    const now = value();
    steady = now === last ? steady + 1 : 0;
    last = now;
  }
  return last;
}

describe('bounds per connection', () => {
  it('keeps at most MAX_IN_FLIGHT_REQUESTS requests in flight, however small they are', async () => {
    let started = 0;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const slow = wrap(device, {
      flush: async () => {
        started++;
        await gate;
      },
    });
    await start([{ name: '', device: slow }]);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const count = 1000;
    for (let i = 0; i < count; i++) client.request(P.NBD_CMD_FLUSH, 0, 0);
    expect(await settled(() => started)).toBe(MAX_IN_FLIGHT_REQUESTS);
    open();
    for (let i = 0; i < count; i++) expect((await client.simpleReply()).error).toBe(0);
    expect(started).toBe(count);
    client.destroy();
  });

  it('ends the connection of a client that stops reading its replies and then leaves', async () => {
    let left!: () => void;
    const disconnected = new Promise<void>((resolve) => {
      left = resolve;
    });
    let reads = 0;
    const counting = wrap(device, {
      readInto: (buffer: Uint8Array, offset: number) => {
        reads++;
        return device.readInto(buffer, offset);
      },
    });
    await start([{ name: '', device: counting }], {
      maxInFlightBytes: 1024 * 1024,
      onDisconnect: () => left(),
    });
    const client = await TestClient.connect(socketPath);
    await client.open();
    client.socket.pause();
    // 64 MiB asked for: the server stops at the bound with a request held, its replies unread.
    for (let i = 0; i < 128; i++) client.request(P.NBD_CMD_READ, 0, 512 * 1024);
    const started = await settled(() => reads);
    expect(started).toBeLessThan(128);
    client.destroy();
    await disconnected;
    expect(server!.connections).toBe(0);
    // The requests not yet started when the client left were dropped, not served (each would
    // have taken its 512 KiB buffer at once).
    expect(reads).toBe(started);
  });

  it('counts error replies in the bytes queued for a client that does not read them', async () => {
    const maxInFlightBytes = 256 * 1024;
    const queued = watchQueuedReplies();
    await start([{ name: '', device }], { maxInFlightBytes });
    const client = await TestClient.connect(socketPath);
    await client.open({ structured: true });
    client.socket.pause();
    // READs past the end, each answered at once with an EINVAL error chunk of about 46 bytes:
    // 9 MiB of replies, more than the socket's buffers (4 MiB) and the bound take together.
    const count = 200_000;
    const requests = Buffer.alloc(count * P.REQUEST_HEADER_SIZE);
    for (let i = 0; i < count; i++) {
      const header = P.encodeRequestHeader({
        magic: P.NBD_REQUEST_MAGIC,
        flags: 0,
        type: P.NBD_CMD_READ,
        cookie: BigInt(i),
        offset: SIZE,
        length: 4096,
      });
      header.copy(requests, i * P.REQUEST_HEADER_SIZE);
    }
    queued.reset();
    client.socket.write(requests);
    const answered = await settled(() => queued.replies, 100);
    // The server stopped reading: not every request was answered while the replies stay unread.
    expect(answered).toBeGreaterThan(0);
    expect(answered).toBeLessThan(count);
    expect(queued.mostPending).toBeLessThanOrEqual(maxInFlightBytes + 1024);
    client.destroy();
  });
});

describe('a graceful stop', () => {
  it('drops a client that neither reads its replies nor leaves, once its grace is over', async () => {
    let reads = 0;
    const counting = wrap(device, {
      readInto: (buffer: Uint8Array, offset: number) => {
        reads++;
        return device.readInto(buffer, offset);
      },
    });
    await start([{ name: '', device: counting }], { maxInFlightBytes: 2 * 1024 * 1024 });
    const client = await TestClient.connect(socketPath);
    await client.open();
    client.socket.pause();
    // 32 MiB of READ replies, none read: more than the socket's buffers and the bound.
    for (let i = 0; i < 64; i++) client.request(P.NBD_CMD_READ, 0, 512 * 1024);
    expect(await settled(() => reads)).toBeLessThan(64);
    const closed = client.closed();
    // Before, close() waited for the replies to be written, for as long as the client lived.
    await server!.close();
    expect(server!.connections).toBe(0);
    // The client finds its connection closed once it reads what the server managed to send.
    client.reader.detach();
    client.socket.on('data', () => {});
    client.socket.resume();
    expect(await closed).toBe(true);
  }, 10_000);
});

describe('handshake', () => {
  it('stops reading options while their replies wait to be written', async () => {
    const queued = watchQueuedReplies();
    await start([{ name: '', device }]);
    const client = await TestClient.connect(socketPath);
    await client.greeting();
    client.socket.pause();
    // INFO options of 32 bytes, each answered with about 90 bytes in 4 replies, never read:
    // 3.6 MiB of replies, more than the socket's buffer takes.
    const count = 40_000;
    const payload = infoPayload('', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION]);
    const option = Buffer.alloc(16 + payload.length);
    option.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
    option.writeUInt32BE(P.NBD_OPT_INFO, 8);
    option.writeUInt32BE(payload.length, 12);
    payload.copy(option, 16);
    queued.reset();
    client.socket.write(Buffer.concat(Array.from({ length: count }, () => option)));
    const answered = await settled(() => queued.replies, 100);
    expect(answered).toBeGreaterThan(0);
    expect(answered).toBeLessThan(4 * count);
    // One option's replies may pass the bound before the server waits.
    expect(queued.mostPending).toBeLessThanOrEqual(HANDSHAKE_PENDING_MAX + 1024);
    client.destroy();
  });
});
