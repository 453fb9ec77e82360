import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createNbdServer, type NbdExport, type NbdServer, protocol as P } from '../src/index.js';
import { descriptors, wrap } from './helpers.js';
import { metaContextPayload, TestClient } from './test-client.js';

const SIZE = 1024 * 1024;
let dir: string;
let server: NbdServer;
let socketPath: string;
let device: MemoryBlockDevice;
let logs: string[];

async function start(exports?: NbdExport[], extra: Partial<Parameters<typeof createNbdServer>[0]> = {}) {
  logs = [];
  server = createNbdServer({
    exports: exports ?? [{ name: 'disk', description: 'a disk', device }],
    log: (m) => logs.push(m),
    ...extra,
  });
  await server.listen({ path: socketPath });
}

function pattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-'));
  socketPath = join(dir, 'nbd.sock');
  device = new MemoryBlockDevice(SIZE);
});

afterEach(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('handshake', () => {
  it('sends a fixed newstyle greeting with NO_ZEROES and lists exports', async () => {
    await start([
      { name: 'disk', description: 'a disk', device },
      { name: 'other', device: new MemoryBlockDevice(4096) },
    ]);
    const client = await TestClient.connect(socketPath);
    expect(await client.greeting()).toBe(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    client.sendOption(P.NBD_OPT_LIST);
    const replies = await client.optionReplies();
    expect(replies.map((r) => r.type)).toEqual([P.NBD_REP_SERVER, P.NBD_REP_SERVER, P.NBD_REP_ACK]);
    expect(replies[0]!.data.subarray(4, 8).toString()).toBe('disk');
    expect(replies[0]!.data.subarray(8).toString()).toBe('a disk');
    client.sendOption(P.NBD_OPT_LIST, Buffer.from('x'));
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    client.sendOption(P.NBD_OPT_ABORT);
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ACK);
    expect(await client.closed()).toBe(true);
  });

  it('answers INFO and GO with export, name, description and block size info', async () => {
    await start();
    const client = await TestClient.connect(socketPath);
    await client.greeting();
    client.sendOption(P.NBD_OPT_INFO, infoFor('disk', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION]));
    const replies = await client.optionReplies();
    const infos = new Map(
      replies.filter((r) => r.type === P.NBD_REP_INFO).map((r) => [r.data.readUInt16BE(0), r.data]),
    );
    expect(Number(infos.get(P.NBD_INFO_EXPORT)!.readBigUInt64BE(2))).toBe(SIZE);
    expect(infos.get(P.NBD_INFO_NAME)!.subarray(2).toString()).toBe('disk');
    expect(infos.get(P.NBD_INFO_DESCRIPTION)!.subarray(2).toString()).toBe('a disk');
    const blockSize = infos.get(P.NBD_INFO_BLOCK_SIZE)!;
    expect([blockSize.readUInt32BE(2), blockSize.readUInt32BE(10)]).toEqual([1, 32 * 1024 * 1024]);
    client.sendOption(P.NBD_OPT_GO, infoFor('nope'));
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_UNKNOWN);
    const { size, flags } = await client.go('disk');
    expect(size).toBe(SIZE);
    expect(flags & P.NBD_FLAG_READ_ONLY).toBe(0);
    expect(flags & P.NBD_FLAG_SEND_TRIM).toBe(P.NBD_FLAG_SEND_TRIM);
    expect(flags & P.NBD_FLAG_SEND_DF).toBe(0);
    client.destroy();
  });

  it('rejects unknown options, meta contexts before structured replies, and malformed payloads', async () => {
    await start();
    const client = await TestClient.connect(socketPath);
    await client.greeting();
    client.sendOption(4242);
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP);
    client.sendOption(P.NBD_OPT_EXTENDED_HEADERS);
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP);
    client.sendOption(P.NBD_OPT_STARTTLS);
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP);
    client.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaContextPayload('disk', ['base:allocation']));
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    client.sendOption(P.NBD_OPT_STRUCTURED_REPLY, Buffer.from([1]));
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    client.sendOption(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 9, 1]));
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    client.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    expect((await client.optionReply()).type).toBe(P.NBD_REP_ACK);
    client.sendOption(P.NBD_OPT_LIST_META_CONTEXT, metaContextPayload('disk', []));
    const listed = await client.optionReplies();
    expect(
      listed.filter((r) => r.type === P.NBD_REP_META_CONTEXT).map((r) => r.data.subarray(4).toString()),
    ).toEqual(['base:allocation']);
    client.sendOption(
      P.NBD_OPT_SET_META_CONTEXT,
      metaContextPayload('disk', ['qemu:allocation-depth', 'x:y']),
    );
    expect((await client.optionReplies()).map((r) => r.type)).toEqual([P.NBD_REP_ACK]);
    const { flags } = await client.go('disk');
    expect(flags & P.NBD_FLAG_SEND_DF).toBe(P.NBD_FLAG_SEND_DF);
    client.destroy();
  });

  it('serves EXPORT_NAME without zeroes when negotiated and with 124 zeroes otherwise', async () => {
    await start();
    for (const noZeroes of [true, false]) {
      const client = await TestClient.connect(socketPath);
      await client.greeting(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      client.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
      const reply = await client.reader.read(noZeroes ? 10 : 134);
      expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
      client.request(P.NBD_CMD_READ, 0, 4);
      expect((await client.simpleReply(4)).error).toBe(0);
      client.destroy();
    }
  });

  it('keeps clients beyond maxConnections waiting until a slot frees, without multi-conn', async () => {
    await start(undefined, { maxConnections: 1 });
    const first = await TestClient.connect(socketPath);
    const { flags } = await first.open();
    expect(flags & P.NBD_FLAG_CAN_MULTI_CONN).toBe(0);
    const second = await TestClient.connect(socketPath);
    let greeted = false;
    const greeting = second.greeting().then((value) => {
      greeted = true;
      return value;
    });
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(greeted).toBe(false);
    first.request(P.NBD_CMD_DISC, 0, 0);
    await greeting;
    expect(greeted).toBe(true);
    second.sendOption(P.NBD_OPT_ABORT);
    expect((await second.optionReply()).type).toBe(P.NBD_REP_ACK);
  });

  it('closes the connection on an unknown EXPORT_NAME, a bad option magic, unknown client flags', async () => {
    await start();
    const a = await TestClient.connect(socketPath);
    await a.greeting();
    a.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope'));
    expect(await a.closed()).toBe(true);
    const b = await TestClient.connect(socketPath);
    await b.greeting();
    b.sendOption(P.NBD_OPT_LIST, Buffer.alloc(0), 0x1234n);
    expect(await b.closed()).toBe(true);
    const c = await TestClient.connect(socketPath);
    await c.greeting(0x80);
    expect(await c.closed()).toBe(true);
  });
});

describe('transmission', () => {
  it('writes and reads back with simple replies, FUA, flush, cache', async () => {
    await start();
    const client = await TestClient.connect(socketPath);
    await client.open({ name: 'disk' });
    const data = pattern(10_000, 3);
    const w = client.request(P.NBD_CMD_WRITE, 4095, data.length, { data, flags: P.NBD_CMD_FLAG_FUA });
    expect(await client.simpleReply()).toMatchObject({ error: 0, cookie: w });
    client.request(P.NBD_CMD_FLUSH, 0, 0);
    expect((await client.simpleReply()).error).toBe(0);
    // A WRITE of 0 bytes has no payload and succeeds.
    client.request(P.NBD_CMD_WRITE, 100, 0, { data: Buffer.alloc(0) });
    expect((await client.simpleReply()).error).toBe(0);
    client.request(P.NBD_CMD_CACHE, 0, 4096);
    expect((await client.simpleReply()).error).toBe(0);
    client.request(P.NBD_CMD_READ, 4095, data.length);
    expect((await client.simpleReply(data.length)).data.equals(data)).toBe(true);
    expect(Buffer.from(await device.read(4095, data.length)).equals(data)).toBe(true);
    client.request(P.NBD_CMD_DISC, 0, 0);
    expect(await client.closed()).toBe(true);
  });

  it('answers pipelined requests, each with its own cookie', async () => {
    await start();
    const client = await TestClient.connect(socketPath);
    await client.open();
    const cookies = new Set<bigint>();
    for (let i = 0; i < 64; i++) {
      const data = pattern(4096, i);
      cookies.add(client.request(P.NBD_CMD_WRITE, i * 4096, 4096, { data }));
    }
    for (let i = 0; i < 64; i++) {
      const reply = await client.simpleReply();
      expect(reply.error).toBe(0);
      cookies.delete(reply.cookie);
    }
    expect(cookies.size).toBe(0);
    expect(Buffer.from(await device.read(63 * 4096, 4096)).equals(pattern(4096, 63))).toBe(true);
    client.destroy();
  });

  it('zeroes, trims and reports holes with structured replies and block status', async () => {
    await start([{ name: '', device, allocationDepth: true }]);
    await device.write(0, pattern(SIZE, 1));
    const client = await TestClient.connect(socketPath);
    await client.open({ structured: true, contexts: ['base:allocation', 'qemu:allocation-depth'] });
    client.request(P.NBD_CMD_WRITE_ZEROES, 128 * 1024, 256 * 1024);
    expect((await client.simpleReply()).error).toBe(0);
    client.request(P.NBD_CMD_TRIM, 512 * 1024, 64 * 1024);
    expect((await client.simpleReply()).error).toBe(0);
    client.request(P.NBD_CMD_READ, 0, SIZE);
    const chunks = await client.chunks();
    const holes = chunks.filter((c) => c.type === P.NBD_REPLY_TYPE_OFFSET_HOLE);
    expect(holes.map((h) => [Number(h.payload.readBigUInt64BE(0)), h.payload.readUInt32BE(8)])).toEqual([
      [128 * 1024, 256 * 1024],
      [512 * 1024, 64 * 1024],
    ]);
    const assembled = Buffer.alloc(SIZE);
    for (const chunk of chunks.filter((c) => c.type === P.NBD_REPLY_TYPE_OFFSET_DATA)) {
      chunk.payload.copy(assembled, Number(chunk.payload.readBigUInt64BE(0)), 8);
    }
    expect(assembled.equals(Buffer.from(await device.read(0, SIZE)))).toBe(true);

    client.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE);
    const status = await client.chunks();
    expect(status.map((c) => c.type)).toEqual([P.NBD_REPLY_TYPE_BLOCK_STATUS, P.NBD_REPLY_TYPE_BLOCK_STATUS]);
    const base = status.find((c) => c.payload.readUInt32BE(0) === 1)!;
    expect(descriptors(base.payload)).toEqual([
      [128 * 1024, 0],
      [256 * 1024, 3],
      [128 * 1024, 0],
      [64 * 1024, 3],
      [SIZE - 576 * 1024, 0],
    ]);
    client.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE, { flags: P.NBD_CMD_FLAG_REQ_ONE });
    const one = await client.chunks();
    expect(descriptors(one[0]!.payload)).toHaveLength(1);

    client.request(P.NBD_CMD_READ, 0, 70_000, { flags: P.NBD_CMD_FLAG_DF });
    const single = await client.chunks();
    expect(single).toHaveLength(1);
    expect(single[0]!.type).toBe(P.NBD_REPLY_TYPE_OFFSET_DATA);
    client.request(P.NBD_CMD_READ, SIZE, 1);
    const error = await client.chunks();
    expect(error[0]!.type).toBe(P.NBD_REPLY_TYPE_ERROR);
    expect(error[0]!.payload.readUInt32BE(0)).toBe(P.NBD_EINVAL);
    client.destroy();
  });

  it('answers base:allocation over known data without asking the device, and forgets zeroed ranges', async () => {
    let statusCalls = 0;
    const counting = wrap(device, {
      blockStatus: (offset: number, length: number) => {
        statusCalls++;
        return device.blockStatus(offset, length);
      },
    });
    await device.write(0, pattern(SIZE, 3));
    await start([{ name: '', device: counting }]);
    const client = await TestClient.connect(socketPath);
    await client.open({ structured: true, contexts: ['base:allocation'] });
    client.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE);
    expect(descriptors((await client.chunks())[0]!.payload)).toEqual([[SIZE, 0]]);
    const asked = statusCalls;
    for (let i = 0; i < 4; i++) {
      client.request(P.NBD_CMD_BLOCK_STATUS, i * 65536, 65536);
      expect(descriptors((await client.chunks())[0]!.payload)).toEqual([[65536, 0]]);
    }
    expect(statusCalls).toBe(asked);
    // Zeroing makes a hole the cache must not hide.
    client.request(P.NBD_CMD_WRITE_ZEROES, 65536, 65536);
    expect((await client.simpleReply()).error).toBe(0);
    client.request(P.NBD_CMD_BLOCK_STATUS, 65536, 65536);
    expect(descriptors((await client.chunks())[0]!.payload)).toEqual([[65536, 3]]);
    expect(statusCalls).toBeGreaterThan(asked);
    client.destroy();
  });

  it.each(['direct', 'stream'] as const)(
    'answers many pipelined small reads and large writes intact and in any order (%s reads)',
    async (readMode) => {
      await start(undefined, { readMode });
      const client = await TestClient.connect(socketPath);
      await client.open({ structured: true });
      // Large writes whose payloads span socket chunks land in reused buffers: each must stay intact.
      for (let i = 0; i < 8; i++) {
        client.request(P.NBD_CMD_WRITE, i * 131072, 131072, { data: pattern(131072, i) });
      }
      for (let i = 0; i < 8; i++) expect((await client.simpleReply()).error).toBe(0);
      for (let i = 0; i < 8; i++) {
        expect(Buffer.from(await device.read(i * 131072, 131072)).equals(pattern(131072, i))).toBe(true);
      }
      // 64 small reads in one burst: their replies leave together, each whole.
      const cookies: bigint[] = [];
      for (let i = 0; i < 64; i++) cookies.push(client.request(P.NBD_CMD_READ, i * 4096 + 7, 4096));
      const seen = new Set<bigint>();
      for (let i = 0; i < 64; i++) {
        const [chunk] = await client.chunks();
        const offset = Number(chunk!.payload.readBigUInt64BE(0));
        const index = (offset - 7) / 4096;
        expect(chunk!.cookie).toBe(cookies[index]);
        seen.add(chunk!.cookie);
        expect(chunk!.payload.subarray(8).equals(Buffer.from(await device.read(offset, 4096)))).toBe(true);
      }
      expect(seen.size).toBe(64);
      client.destroy();
    },
  );

  it('answers every bad request with the error the spec names and keeps serving', async () => {
    await start([
      { name: 'rw', device },
      { name: 'ro', device, readOnly: true },
    ]);
    const client = await TestClient.connect(socketPath);
    await client.open({ name: 'rw' });
    const expectError = async (error: number) => expect((await client.simpleReply()).error).toBe(error);
    client.request(P.NBD_CMD_READ, SIZE - 1, 2);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_WRITE, SIZE - 1, 2, { data: Buffer.alloc(2) });
    await expectError(P.NBD_ENOSPC);
    client.request(P.NBD_CMD_WRITE_ZEROES, SIZE, 1);
    await expectError(P.NBD_ENOSPC);
    client.request(P.NBD_CMD_TRIM, SIZE, 1);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_READ, 0, 2 ** 31);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_READ, 2 ** 60, 1);
    await expectError(P.NBD_EINVAL);
    client.request(99, 0, 0);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_READ, 0, 1, { flags: 0x100 });
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_READ, 0, 1, { flags: P.NBD_CMD_FLAG_DF });
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_FLUSH, 1, 0);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_BLOCK_STATUS, 0, 512);
    await expectError(P.NBD_EINVAL);
    client.request(P.NBD_CMD_READ, 0, 3);
    expect((await client.simpleReply(3)).error).toBe(0);

    const ro = await TestClient.connect(socketPath);
    const { flags } = await ro.open({ name: 'ro' });
    expect(flags & P.NBD_FLAG_READ_ONLY).toBe(P.NBD_FLAG_READ_ONLY);
    expect(flags & P.NBD_FLAG_SEND_WRITE_ZEROES).toBe(0);
    ro.request(P.NBD_CMD_WRITE, 0, 4, { data: Buffer.alloc(4) });
    expect((await ro.simpleReply()).error).toBe(P.NBD_EPERM);
    ro.request(P.NBD_CMD_TRIM, 0, 4);
    expect((await ro.simpleReply()).error).toBe(P.NBD_EPERM);
    ro.request(P.NBD_CMD_WRITE_ZEROES, 0, 4);
    expect((await ro.simpleReply()).error).toBe(P.NBD_EPERM);
    ro.request(P.NBD_CMD_FLUSH, 0, 0);
    expect((await ro.simpleReply()).error).toBe(0);
    client.destroy();
    ro.destroy();
  });

  it('closes only the connection that sends a bad magic or a 2 GiB write', async () => {
    await start();
    const good = await TestClient.connect(socketPath);
    await good.open();
    const bad = await TestClient.connect(socketPath);
    await bad.open();
    bad.request(P.NBD_CMD_READ, 0, 1, { magic: 0xdeadbeef });
    expect(await bad.closed()).toBe(true);
    const big = await TestClient.connect(socketPath);
    await big.open();
    big.request(P.NBD_CMD_WRITE, 0, 2 ** 31, { data: Buffer.alloc(1000) });
    expect((await big.simpleReply()).error).toBe(P.NBD_EINVAL);
    expect(await big.closed()).toBe(true);
    const garbage = await TestClient.connect(socketPath);
    garbage.socket.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'.repeat(10)));
    expect(await garbage.closed()).toBe(true);
    good.request(P.NBD_CMD_READ, 0, 8);
    expect((await good.simpleReply(8)).error).toBe(0);
    expect(logs.some((line) => line.includes('bad magic'))).toBe(true);
    good.destroy();
  });

  it('advertises FAST_ZERO and refuses it at once where the device cannot zero fast; maps device errors', async () => {
    const failing: NbdExport = {
      name: '',
      device: wrap(device, {
        capabilities: { ...device.capabilities, fastZero: false },
        write: () => Promise.reject(new Error('disk on fire')),
      }),
    };
    await start([failing]);
    const client = await TestClient.connect(socketPath);
    const { flags } = await client.open();
    expect(flags & P.NBD_FLAG_SEND_FAST_ZERO).not.toBe(0);
    await device.write(0, new Uint8Array(4096).fill(7));
    client.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096, { flags: P.NBD_CMD_FLAG_FAST_ZERO });
    expect((await client.simpleReply()).error).toBe(P.NBD_ENOTSUP);
    expect((await device.read(0, 4096)).every((byte) => byte === 7)).toBe(true);
    // Without the flag the same request zeroes (by writing, as the device must).
    client.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096);
    expect((await client.simpleReply()).error).toBe(0);
    expect((await device.read(0, 4096)).every((byte) => byte === 0)).toBe(true);
    client.request(P.NBD_CMD_WRITE, 0, 4, { data: Buffer.alloc(4) });
    expect((await client.simpleReply()).error).toBe(P.NBD_EIO);
    client.destroy();
  });

  it.each(['direct', 'stream'] as const)(
    'handles 32 MiB writes and reads, and many pipelined writes under a small in-flight bound (%s reads)',
    async (readMode) => {
      const big = new MemoryBlockDevice(64 * 1024 * 1024);
      await start([{ name: '', device: big }], { maxInFlightBytes: 64 * 1024, readMode });
      const client = await TestClient.connect(socketPath);
      await client.open({ structured: true });
      const data = pattern(32 * 1024 * 1024, 9);
      client.request(P.NBD_CMD_WRITE, 1000, data.length, { data });
      expect((await client.simpleReply()).error).toBe(0);
      for (let i = 0; i < 200; i++)
        client.request(P.NBD_CMD_WRITE, i * 8192, 8192, { data: pattern(8192, i) });
      for (let i = 0; i < 200; i++) expect((await client.simpleReply()).error).toBe(0);
      client.request(P.NBD_CMD_READ, 16 * 1024 * 1024, 32 * 1024 * 1024);
      const chunks = await client.chunks();
      expect(
        chunks.every(
          (c) => c.type === P.NBD_REPLY_TYPE_OFFSET_DATA || c.type === P.NBD_REPLY_TYPE_OFFSET_HOLE,
        ),
      ).toBe(true);
      const total = chunks.reduce(
        (sum, c) =>
          sum + (c.type === P.NBD_REPLY_TYPE_OFFSET_DATA ? c.payload.length - 8 : c.payload.readUInt32BE(8)),
        0,
      );
      expect(total).toBe(32 * 1024 * 1024);
      expect(
        Buffer.from(await big.read(200 * 8192, 4096)).equals(
          data.subarray(200 * 8192 - 1000, 200 * 8192 - 1000 + 4096),
        ),
      ).toBe(true);
      expect(Buffer.from(await big.read(199 * 8192, 8192)).equals(pattern(8192, 199))).toBe(true);
      client.destroy();
    },
  );

  it.each(['direct', 'stream'] as const)(
    'stops serving a client that does not read its replies (bounded memory), then catches up (%s reads)',
    async (readMode) => {
      let reads = 0;
      const counting = wrap(device, {
        readInto: (buffer: Uint8Array, offset: number) => {
          reads++;
          return device.readInto(buffer, offset);
        },
      });
      await start([{ name: '', device: counting }], { maxInFlightBytes: 2 * 1024 * 1024, readMode });
      const client = await TestClient.connect(socketPath);
      await client.open();
      client.socket.pause();
      for (let i = 0; i < 100; i++) client.request(P.NBD_CMD_READ, 0, 512 * 1024);
      // Once the server has stopped reading (no new read for a while), far fewer than 100 were served:
      // the bound (2 MiB) plus what the socket buffers hold (4 MiB asked on unix sockets, doubled).
      let last = -1;
      for (let steady = 0; steady < 3; ) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        steady = reads === last ? steady + 1 : 0;
        last = reads;
      }
      expect(reads).toBeGreaterThan(0);
      expect(reads).toBeLessThan(40);
      client.socket.resume();
      for (let i = 0; i < 100; i++) expect((await client.simpleReply(512 * 1024)).error).toBe(0);
      expect(reads).toBe(100);
      client.destroy();
    },
  );

  it('closes a connection that does not finish the handshake in time', async () => {
    await start(undefined, { handshakeTimeout: 100 });
    const client = await TestClient.connect(socketPath);
    await client.greeting();
    expect(await client.closed()).toBe(true);
    expect(logs.some((line) => line.includes('too slow'))).toBe(true);
  });

  it.each(['direct', 'stream'] as const)(
    'ends a connection whose client leaves right after the handshake, pipelined requests answered (%s reads)',
    async (readMode) => {
      let left!: () => void;
      const disconnected = new Promise<void>((resolve) => {
        left = resolve;
      });
      await start(undefined, { readMode, onDisconnect: () => left() });
      const client = await TestClient.connect(socketPath);
      await client.greeting();
      // GO, a WRITE and a READ in one burst: the requests reach the server with the handshake.
      client.sendOption(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 4, ...Buffer.from('disk'), 0, 0]));
      client.request(P.NBD_CMD_WRITE, 512, 4, { data: Buffer.from('abcd') });
      client.request(P.NBD_CMD_READ, 512, 4);
      const replies = await client.optionReplies();
      expect(replies.at(-1)!.type).toBe(P.NBD_REP_ACK);
      expect((await client.simpleReply()).error).toBe(0);
      expect((await client.simpleReply(4)).data.toString()).toBe('abcd');
      client.destroy();
      await disconnected;
      expect(server.connections).toBe(0);
    },
  );

  it('survives a client that leaves in the middle of a large WRITE payload', async () => {
    let left!: () => void;
    const disconnected = new Promise<void>((resolve) => {
      left = resolve;
    });
    await start(undefined, { onDisconnect: () => left() });
    const client = await TestClient.connect(socketPath);
    await client.open();
    // Half of a 512 KiB payload: the server is receiving it straight into its buffer.
    const header = P.encodeRequestHeader({
      magic: P.NBD_REQUEST_MAGIC,
      flags: 0,
      type: P.NBD_CMD_WRITE,
      cookie: 1n,
      offset: 0,
      length: 512 * 1024,
    });
    client.socket.write(Buffer.concat([header, pattern(256 * 1024, 5)]));
    await new Promise((resolve) => setTimeout(resolve, 50));
    client.destroy();
    await disconnected;
    expect(server.connections).toBe(0);
    // Nothing of the unfinished write reached the device; the server still serves.
    expect(Buffer.from(await device.read(0, 4096)).every((byte) => byte === 0)).toBe(true);
    const next = await TestClient.connect(socketPath);
    await next.open();
    next.request(P.NBD_CMD_READ, 0, 512);
    expect((await next.simpleReply(512)).error).toBe(0);
    next.destroy();
  });

  it('finishes requests in flight and flushes on close', async () => {
    let flushes = 0;
    let writeStarted!: () => void;
    const started = new Promise<void>((resolve) => {
      writeStarted = resolve;
    });
    const counting = wrap(device, {
      flush: async () => {
        flushes++;
      },
      // The write is in flight when the server is closed (it lands a little later).
      write: async (offset: number, data: Uint8Array) => {
        writeStarted();
        await new Promise((resolve) => setTimeout(resolve, 10));
        await device.write(offset, data);
      },
    });
    await start([{ name: '', device: counting }]);
    const client = await TestClient.connect(socketPath);
    await client.open();
    const data = pattern(1 << 20, 7);
    client.request(P.NBD_CMD_WRITE, 0, data.length, { data });
    const reply = client.simpleReply();
    await started;
    await server.close();
    expect((await reply).error).toBe(0);
    expect(flushes).toBe(1);
    expect(Buffer.from(await device.read(0, data.length)).equals(data)).toBe(true);
    expect(await client.closed()).toBe(true);
  });
});

function infoFor(name: string, infos: number[] = []): Buffer {
  const nameBytes = Buffer.from(name);
  const out = Buffer.alloc(6 + nameBytes.length + 2 * infos.length);
  out.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(out, 4);
  out.writeUInt16BE(infos.length, 4 + nameBytes.length);
  for (const [i, info] of infos.entries()) out.writeUInt16BE(info, 6 + nameBytes.length + 2 * i);
  return out;
}
