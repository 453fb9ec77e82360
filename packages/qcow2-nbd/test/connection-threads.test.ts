/**
 * Connections served by threads of their own (connection-threads.ts, thread-loop.ts), through a
 * whole server in this process and a byte-level client: the thread answers exactly as the event
 * loop does (a property over random request streams arriving in random pieces, against a server
 * with `connectionThreads: false` on a copy of the same file); requests it does not serve are
 * answered by the main thread on the same stream; a broken stream ends that connection only; a
 * client leaving, DISC and a graceful stop all let the connection go at once.
 */
import { randomFillSync } from 'node:crypto';
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createNbdServer, type NbdServer, protocol as P } from '../src/index.js';
import { ConnectionThreads } from '../src/server/connection-threads.js';
import { Transmission } from '../src/server/transmission.js';
import { TestClient } from './test-client.js';

const KiB = 1024;
const SIZE = 1024 * KiB + 512;

let dir: string;
const servers: NbdServer[] = [];
const files: FileBlockDevice[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qcowkit-nbd-threads-'));
});

afterEach(async () => {
  vi.restoreAllMocks();
  for (const server of servers.splice(0)) await server.close();
  for (const file of files.splice(0)) await file.close();
  rmSync(dir, { recursive: true, force: true });
});

async function serveFile(
  name: string,
  contents: Buffer,
  options: { threads: boolean; readOnly?: boolean },
): Promise<{ socket: string; path: string; file: FileBlockDevice }> {
  const path = join(dir, `${name}.raw`);
  writeFileSync(path, contents);
  const file = await FileBlockDevice.open(path, { syncIoMaxBytes: 64 * KiB });
  files.push(file);
  const server = createNbdServer({
    exports: [
      {
        name: '',
        device: file,
        readOnly: options.readOnly,
        fileSource: { fd: file.fd, writes: options.readOnly !== true },
      },
    ],
    connectionThreads: options.threads ? 4 : false,
  });
  servers.push(server);
  const socket = join(dir, `${name}.sock`);
  await server.listen({ path: socket });
  return { socket, path, file };
}

interface Request {
  readonly type: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** A WRITE's payload: `length` bytes of this value (short, so counterexamples print short). */
  readonly fill?: number;
}

/** A reply, with a READ's data whatever its chunks were (a hole and zeros as data are equal). */
interface Reply {
  readonly error: number;
  readonly data?: Buffer;
  readonly status?: string;
}

/** Reads the replies to `requests` (by cookie, in any order), in the framing the session uses. */
async function readReplies(
  client: TestClient,
  requests: Map<bigint, Request>,
  structured: boolean,
): Promise<Map<bigint, Reply>> {
  const out = new Map<bigint, Reply>();
  const partial = new Map<bigint, { data: Buffer; error: number; status: string }>();
  while (out.size < requests.size) {
    const header = await client.reader.read(4);
    if (header.readUInt32BE(0) === P.NBD_SIMPLE_REPLY_MAGIC) {
      const rest = await client.reader.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const request = requests.get(cookie)!;
      const data =
        request.type === P.NBD_CMD_READ && error === 0 && !structured
          ? await client.reader.read(request.length)
          : undefined;
      out.set(cookie, data === undefined ? { error } : { error, data });
      continue;
    }
    expect(header.readUInt32BE(0)).toBe(P.NBD_STRUCTURED_REPLY_MAGIC);
    const rest = await client.reader.read(16);
    const flags = rest.readUInt16BE(0);
    const type = rest.readUInt16BE(2);
    const cookie = rest.readBigUInt64BE(4);
    const payload = await client.reader.read(rest.readUInt32BE(12));
    const request = requests.get(cookie)!;
    let state = partial.get(cookie);
    if (state === undefined) {
      state = {
        data: Buffer.alloc(request.type === P.NBD_CMD_READ ? request.length : 0),
        error: 0,
        status: '',
      };
      partial.set(cookie, state);
    }
    if (type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      payload.copy(state.data, Number(payload.readBigUInt64BE(0)) - request.offset, 8);
    } else if (type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const at = Number(payload.readBigUInt64BE(0)) - request.offset;
      state.data.fill(0, at, at + payload.readUInt32BE(8));
    } else if (type === P.NBD_REPLY_TYPE_ERROR) {
      state.error = payload.readUInt32BE(0);
    } else if (type === P.NBD_REPLY_TYPE_BLOCK_STATUS) {
      state.status += payload.toString('hex');
    }
    if ((flags & P.NBD_REPLY_FLAG_DONE) !== 0) {
      partial.delete(cookie);
      out.set(
        cookie,
        request.type === P.NBD_CMD_READ && state.error === 0
          ? { error: 0, data: state.data }
          : request.type === P.NBD_CMD_BLOCK_STATUS && state.error === 0
            ? { error: 0, status: state.status }
            : { error: state.error },
      );
    }
  }
  return out;
}

/** Sends requests as one stream cut into pieces at `cuts` (byte positions), letting the server
 * read between pieces. Returns the requests by cookie (numbered from `firstCookie`). */
async function sendInPieces(
  client: TestClient,
  requests: readonly Request[],
  cuts: readonly number[],
  firstCookie = 1001n,
) {
  const byCookie = new Map<bigint, Request>();
  const parts: Buffer[] = [];
  let cookie = firstCookie - 1n;
  for (const request of requests) {
    cookie++;
    byCookie.set(cookie, request);
    const { type, flags, offset, length, fill } = request;
    parts.push(
      P.encodeRequestHeader({ magic: P.NBD_REQUEST_MAGIC, cookie, type, flags, offset, length }),
      ...(fill === undefined ? [] : [Buffer.alloc(length, fill)]),
    );
  }
  const stream = Buffer.concat(parts);
  const points = [...new Set(cuts.map((cut) => cut % (stream.length + 1)))].sort((a, b) => a - b);
  let from = 0;
  for (const point of [...points, stream.length]) {
    if (point <= from) continue;
    client.socket.write(stream.subarray(from, point));
    from = point;
    await sleep(1);
  }
  return byCookie;
}

const requestArbitrary = (size: number): fc.Arbitrary<Request> => {
  const offset = fc.oneof(fc.integer({ min: 0, max: size - 1 }), fc.constant(size - 4096), fc.constant(size));
  const length = fc.oneof(
    fc.integer({ min: 0, max: 8 * KiB }),
    fc.integer({ min: 60 * KiB, max: 70 * KiB }),
    fc.integer({ min: 250 * KiB, max: 300 * KiB }),
  );
  const flags = fc.oneof(
    fc.constant(0),
    fc.constant(P.NBD_CMD_FLAG_FUA),
    fc.constant(P.NBD_CMD_FLAG_DF),
    fc.constant(0x40),
  );
  return fc.oneof(
    { weight: 4, arbitrary: fc.record({ type: fc.constant(P.NBD_CMD_READ), flags, offset, length }) },
    {
      weight: 4,
      arbitrary: fc.record({
        type: fc.constant(P.NBD_CMD_WRITE),
        flags,
        offset,
        length,
        fill: fc.integer({ min: 0, max: 255 }),
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        type: fc.constantFrom(
          P.NBD_CMD_WRITE_ZEROES,
          P.NBD_CMD_TRIM,
          P.NBD_CMD_CACHE,
          P.NBD_CMD_BLOCK_STATUS,
          42,
        ),
        flags: fc.constantFrom(0, P.NBD_CMD_FLAG_FUA, P.NBD_CMD_FLAG_NO_HOLE),
        offset,
        length,
      }),
    },
    { weight: 1, arbitrary: fc.constant({ type: P.NBD_CMD_FLUSH, flags: 0, offset: 0, length: 0 }) },
    { weight: 1, arbitrary: fc.record({ type: fc.constant(P.NBD_CMD_FLUSH), flags, offset, length }) },
  );
};

/** Request `index` is a READ and a later request of the stream writes, zeroes or trims bytes of
 * its range. */
function racesLaterChange(requests: readonly Request[], index: number): boolean {
  const read = requests[index];
  if (read === undefined || read.type !== P.NBD_CMD_READ) return false;
  return requests
    .slice(index + 1)
    .some(
      (later) =>
        (later.type === P.NBD_CMD_WRITE ||
          later.type === P.NBD_CMD_WRITE_ZEROES ||
          later.type === P.NBD_CMD_TRIM) &&
        later.offset < read.offset + read.length &&
        read.offset < later.offset + later.length,
    );
}

describe('connections served by threads', () => {
  it.skipIf(!ConnectionThreads.available)(
    'answer every request stream as the event loop does, and leave the same file',
    async () => {
      const contents = randomFillSync(Buffer.alloc(SIZE));
      // Holes, so that READs find some (the event loop sends them as OFFSET_HOLE chunks).
      contents.fill(0, 512 * KiB, 768 * KiB);
      const run = vi.spyOn(Transmission.prototype, 'run');
      await fc.assert(
        fc.asyncProperty(
          fc.array(requestArbitrary(SIZE), { minLength: 1, maxLength: 24 }),
          fc.array(fc.nat(), { maxLength: 12 }),
          fc.constantFrom('simple', 'structured'),
          async (requests, cuts, framing) => {
            const structured = framing === 'structured';
            const answers: { replies: Map<bigint, Reply>; file: Buffer }[] = [];
            for (const threads of [true, false]) {
              const served = await serveFile(threads ? 'threads' : 'loop', contents, { threads });
              run.mockClear();
              const client = await TestClient.connect(served.socket);
              await client.open(structured ? { structured, contexts: [P.BASE_ALLOCATION] } : {});
              let replies: Map<bigint, Reply>;
              if (threads) {
                // Pipelined, in pieces: the thread serves them in order.
                replies = await readReplies(client, await sendInPieces(client, requests, cuts), structured);
              } else {
                // The event loop serves pipelined requests at once, in any order: one at a time
                // gives the order the thread keeps.
                replies = new Map();
                for (const [index, request] of requests.entries()) {
                  const one = await sendInPieces(client, [request], [], 1001n + BigInt(index));
                  for (const [cookie, reply] of await readReplies(client, one, structured)) {
                    replies.set(cookie, reply);
                  }
                }
              }
              client.request(P.NBD_CMD_DISC, 0, 0);
              await client.closed();
              // The thread served this connection: the event loop's request loop never ran.
              expect(run.mock.calls.length).toBe(threads ? 0 : 1);
              answers.push({ replies, file: readFileSync(served.path) });
              await servers.pop()!.close();
              await files.pop()!.close();
            }
            const [thread, loop] = answers;
            expect([...thread!.replies.keys()].sort()).toEqual([...loop!.replies.keys()].sort());
            for (const [cookie, reply] of loop!.replies) {
              const other = thread!.replies.get(cookie)!;
              expect(other.error, `cookie ${cookie}`).toBe(reply.error);
              // A READ pipelined before a request that changes its range may show that change
              // (NBD orders nothing among requests in flight): a long READ leaves by sendfile,
              // which queues the file's pages on the socket, not a copy of them.
              const index = Number(cookie - 1001n);
              if (racesLaterChange(requests, index)) continue;
              expect(other.data?.equals(reply.data!) ?? reply.data === undefined, `cookie ${cookie}`).toBe(
                true,
              );
              expect(other.status).toBe(reply.status);
            }
            expect(thread!.file.equals(loop!.file)).toBe(true);
          },
        ),
        { numRuns: 40 },
      );
    },
    120_000,
  );

  it.skipIf(!ConnectionThreads.available)(
    'large WRITEs are written as they arrive; FUA and FLUSH reach the file',
    async () => {
      const served = await serveFile('big', Buffer.alloc(4 * 1024 * KiB), { threads: true });
      const client = await TestClient.connect(served.socket);
      await client.open({ structured: true });
      const big = randomFillSync(Buffer.alloc(3 * 1024 * KiB + 7));
      const write = client.request(P.NBD_CMD_WRITE, 1000, big.length, {
        data: big,
        flags: P.NBD_CMD_FLAG_FUA,
      });
      expect(await client.simpleReply()).toMatchObject({ cookie: write, error: 0 });
      const flush = client.request(P.NBD_CMD_FLUSH, 0, 0);
      expect(await client.simpleReply()).toMatchObject({ cookie: flush, error: 0 });
      expect(
        readFileSync(served.path)
          .subarray(1000, 1000 + big.length)
          .equals(big),
      ).toBe(true);
      // Read back whole, DF: one data chunk, sent from the file.
      const read = client.request(P.NBD_CMD_READ, 1000, big.length, { flags: P.NBD_CMD_FLAG_DF });
      const [chunk] = await client.chunks();
      expect(chunk).toMatchObject({ cookie: read, type: P.NBD_REPLY_TYPE_OFFSET_DATA });
      expect(chunk!.payload.subarray(8).equals(big)).toBe(true);
      client.destroy();
    },
  );

  it.skipIf(!ConnectionThreads.available)(
    'a file that refuses a long payload answers ENOSPC and the stream goes on',
    async () => {
      // /dev/full refuses every write with ENOSPC, as a full tmpfs would.
      const full = openSync('/dev/full', 'r+');
      try {
        const server = createNbdServer({
          exports: [
            { name: '', device: new MemoryBlockDevice(SIZE), fileSource: { fd: full, writes: true } },
          ],
        });
        servers.push(server);
        const socket = join(dir, 'full.sock');
        await server.listen({ path: socket });
        const client = await TestClient.connect(socket);
        await client.open();
        const large = Buffer.alloc(600 * KiB, 0x77);
        const first = client.request(P.NBD_CMD_WRITE, 0, large.length, { data: large });
        expect(await client.simpleReply()).toMatchObject({ cookie: first, error: P.NBD_ENOSPC });
        const read = client.request(P.NBD_CMD_FLUSH, 0, 0);
        expect((await client.simpleReply()).cookie).toBe(read);
        client.destroy();
      } finally {
        closeSync(full);
      }
    },
  );

  it.skipIf(!ConnectionThreads.available)(
    'a bad magic or a 2 GiB WRITE ends that connection only; others go on',
    async () => {
      const served = await serveFile('magic', randomFillSync(Buffer.alloc(SIZE)), { threads: true });
      const good = await TestClient.connect(served.socket);
      await good.open();
      const bad = await TestClient.connect(served.socket);
      await bad.open();
      bad.request(P.NBD_CMD_READ, 0, 4096, { magic: 0x12345678 });
      expect(await bad.closed()).toBe(true);
      // A WRITE whose payload cannot be trusted to follow: EINVAL, then the connection is closed.
      const huge = await TestClient.connect(served.socket);
      await huge.open();
      const hugeCookie = huge.request(P.NBD_CMD_WRITE, 0, 2 ** 31, { data: Buffer.alloc(1000, 1) });
      expect(await huge.simpleReply()).toMatchObject({ cookie: hugeCookie, error: P.NBD_EINVAL });
      expect(await huge.closed()).toBe(true);
      const cookie = good.request(P.NBD_CMD_READ, 4096, 4096);
      const reply = await good.simpleReply(4096);
      expect(reply.cookie).toBe(cookie);
      expect(reply.data.equals(readFileSync(served.path).subarray(4096, 8192))).toBe(true);
      good.destroy();
    },
  );

  it.skipIf(!ConnectionThreads.available)(
    'a read-only export refuses WRITEs with EPERM from its thread',
    async () => {
      const served = await serveFile('ro', randomFillSync(Buffer.alloc(SIZE)), {
        threads: true,
        readOnly: true,
      });
      const client = await TestClient.connect(served.socket);
      const { flags } = await client.open();
      expect(flags & P.NBD_FLAG_READ_ONLY).not.toBe(0);
      const cookie = client.request(P.NBD_CMD_WRITE, 0, 4096, { data: Buffer.alloc(4096, 1) });
      expect(await client.simpleReply()).toMatchObject({ cookie, error: P.NBD_EPERM });
      client.destroy();
    },
  );

  it.skipIf(!ConnectionThreads.available)(
    'DISC, a client leaving and a graceful stop let the connection go at once',
    async () => {
      const served = await serveFile('stop', randomFillSync(Buffer.alloc(SIZE)), { threads: true });
      for (const how of ['disc', 'leave'] as const) {
        const client = await TestClient.connect(served.socket);
        await client.open();
        const started = Date.now();
        if (how === 'disc') client.request(P.NBD_CMD_DISC, 0, 0);
        else client.socket.end();
        await client.closed();
        expect(Date.now() - started).toBeLessThan(1000);
      }
      // A stop while a client is connected and idle: its connection is closed, the server stops.
      const idle = await TestClient.connect(served.socket);
      await idle.open();
      const cookie = idle.request(P.NBD_CMD_WRITE, 0, 4096, { data: Buffer.alloc(4096, 9) });
      expect((await idle.simpleReply()).cookie).toBe(cookie);
      const started = Date.now();
      await servers.pop()!.close();
      expect(await idle.closed()).toBe(true);
      expect(Date.now() - started).toBeLessThan(2000);
      expect(readFileSync(served.path).subarray(0, 4096).equals(Buffer.alloc(4096, 9))).toBe(true);
    },
  );

  it.skipIf(!ConnectionThreads.available)(
    'a graceful stop drops a client that does not read what the main thread answers for its thread',
    async () => {
      // 4 MiB of data, then a hole: READs over both go to the main thread (holes are sent as such).
      const path = join(dir, 'sparse.raw');
      writeFileSync(path, randomFillSync(Buffer.alloc(4096 * KiB)));
      truncateSync(path, 8192 * KiB);
      const file = await FileBlockDevice.open(path);
      files.push(file);
      const server = createNbdServer({
        exports: [{ name: '', device: file, fileSource: { fd: file.fd } }],
        connectionThreads: 4,
      });
      servers.push(server);
      const socket = join(dir, 'sparse.sock');
      await server.listen({ path: socket });
      const client = await TestClient.connect(socket);
      await client.open({ structured: true });
      client.socket.pause();
      const forwarded = vi.spyOn(Transmission.prototype, 'serveForwarded');
      for (let i = 0; i < 16; i++) client.request(P.NBD_CMD_READ, 0, 8192 * KiB);
      // Until the main thread's replies fill the socket and the thread waits for them to leave.
      let last = -1;
      for (let steady = 0; steady < 3; ) {
        await sleep(50);
        const now = forwarded.mock.calls.length;
        steady = now === last && now > 0 ? steady + 1 : 0;
        last = now;
      }
      expect(last).toBeLessThan(16);
      // Before, close() waited for those replies to be written, for as long as the client lived.
      await servers.pop()!.close();
      expect(server.connections).toBe(0);
      client.destroy();
    },
    10_000,
  );

  it.skipIf(!ConnectionThreads.available)(
    'past the thread limit, connections are served on the event loop',
    async () => {
      const path = join(dir, 'limit.raw');
      writeFileSync(path, randomFillSync(Buffer.alloc(SIZE)));
      const file = await FileBlockDevice.open(path);
      files.push(file);
      const server = createNbdServer({
        exports: [{ name: '', device: file, fileSource: { fd: file.fd, writes: true } }],
        connectionThreads: 1,
      });
      servers.push(server);
      const socket = join(dir, 'limit.sock');
      await server.listen({ path: socket });
      const run = vi.spyOn(Transmission.prototype, 'run');
      const first = await TestClient.connect(socket);
      await first.open();
      const second = await TestClient.connect(socket);
      await second.open();
      for (const client of [first, second]) {
        const cookie = client.request(P.NBD_CMD_READ, 0, 512);
        expect((await client.simpleReply(512)).cookie).toBe(cookie);
      }
      expect(run).toHaveBeenCalledTimes(1);
      first.destroy();
      second.destroy();
    },
  );
});
