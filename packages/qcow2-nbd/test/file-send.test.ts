/**
 * READ replies sent from the export's file by sendfile(2) (NbdExport.fileSource): the bytes are
 * the file's, replies keep their framing among the others, a reply larger than the socket's
 * buffer finishes through a buffer, and a client leaving mid-reply harms nobody else.
 */
import { randomFillSync } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type CallResult, FileBlockDevice, loadLibc } from '@qcowkit/blockdev/node';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createNbdServer, type NbdServer, protocol as P } from '../src/index.js';
import { TestClient } from './test-client.js';

const MiB = 1024 * 1024;
const SIZE = 40 * MiB;
let dir: string;
let file: FileBlockDevice;
let contents: Buffer;
let server: NbdServer;
let socketPath: string;
let calls: { length: number; result: CallResult }[];

beforeEach(async () => {
  // Memory-backed where there is one, as the CLI would choose; sendfile works on any file.
  dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qcowkit-nbd-send-'));
  socketPath = join(dir, 'nbd.sock');
  contents = randomFillSync(Buffer.allocUnsafe(SIZE));
  writeFileSync(join(dir, 'disk.raw'), contents);
  file = await FileBlockDevice.open(join(dir, 'disk.raw'), { syncIoMaxBytes: 64 * 1024 });
  server = createNbdServer({
    exports: [{ name: '', device: file, fileSource: { fd: file.fd } }],
    // The event loop's sendfile path (connection threads have their own tests).
    connectionThreads: false,
  });
  await server.listen({ path: socketPath });
  const libc = loadLibc()!;
  const sendFile = libc.sendFile!;
  calls = [];
  vi.spyOn(libc, 'sendFile').mockImplementation((outFd, inFd, inOffset, length) => {
    const result = sendFile(outFd, inFd, inOffset, length);
    calls.push({ length, result });
    return result;
  });
});

afterEach(async () => {
  vi.restoreAllMocks();
  try {
    await server.close();
    await file.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Simple replies in any order, each with the data its READ asked for. */
async function simpleReplies(client: TestClient, lengths: Map<bigint, number>): Promise<Map<bigint, Buffer>> {
  const out = new Map<bigint, Buffer>();
  while (out.size < lengths.size) {
    const header = await client.reader.read(16);
    expect(header.readUInt32BE(0)).toBe(P.NBD_SIMPLE_REPLY_MAGIC);
    expect(header.readUInt32BE(4)).toBe(0);
    const cookie = header.readBigUInt64BE(8);
    const length = lengths.get(cookie);
    expect(length).toBeDefined();
    out.set(cookie, length! > 0 ? await client.reader.read(length!) : Buffer.alloc(0));
  }
  return out;
}

describe('READ replies by sendfile', () => {
  it('carry the file (and writes made through the export), framed among other replies', async () => {
    const client = await TestClient.connect(socketPath);
    await client.open();
    const written = Buffer.alloc(200 * 1024, 0x5a);
    client.request(P.NBD_CMD_WRITE, MiB, written.length, { data: written });
    expect((await client.simpleReply()).error).toBe(0);
    written.copy(contents, MiB);
    // Small and large reads in one burst; the 32 MiB one is larger than any unix socket buffer.
    const reads: [number, number][] = [
      [0, 4096],
      [900 * 1024, MiB],
      [3 * MiB + 17, 100 * 1024],
      [SIZE - 65 * 1024, 65 * 1024],
      [4 * MiB, 32 * MiB],
      [2 * MiB, 4096],
      [SIZE - 70_001, 70_001],
    ];
    const lengths = new Map<bigint, number>();
    const expected = new Map<bigint, Buffer>();
    for (const [offset, length] of reads) {
      const cookie = client.request(P.NBD_CMD_READ, offset, length);
      lengths.set(cookie, length);
      expected.set(cookie, contents.subarray(offset, offset + length));
    }
    lengths.set(client.request(P.NBD_CMD_FLUSH, 0, 0), 0);
    const replies = await simpleReplies(client, lengths);
    for (const [cookie, data] of expected) expect(replies.get(cookie)!.equals(data)).toBe(true);
    // Every read over 64 KiB went by sendfile; the 32 MiB one filled the socket and finished
    // through a buffer (a short count, then the socket full).
    const asked = calls.map((call) => call.length);
    for (const length of [MiB, 100 * 1024, 65 * 1024, 32 * MiB, 70_001]) expect(asked).toContain(length);
    expect(asked).not.toContain(4096);
    expect(
      calls.some((call) => call.length === 32 * MiB && call.result.ok && call.result.value < 32 * MiB),
    ).toBe(true);
    expect(calls.some((call) => !call.result.ok && call.result.code === 'EAGAIN')).toBe(true);
    client.request(P.NBD_CMD_DISC, 0, 0);
    expect(await client.closed()).toBe(true);
  });

  it('sends OFFSET_DATA chunks with structured replies', async () => {
    const client = await TestClient.connect(socketPath);
    await client.open({ structured: true });
    const offset = 5 * MiB + 3;
    const length = 3 * MiB;
    const cookie = client.request(P.NBD_CMD_READ, offset, length);
    const chunks = await client.chunks();
    expect(chunks).toHaveLength(1);
    const [chunk] = chunks;
    expect(chunk!.cookie).toBe(cookie);
    expect(chunk!.type).toBe(P.NBD_REPLY_TYPE_OFFSET_DATA);
    expect(chunk!.flags & P.NBD_REPLY_FLAG_DONE).toBe(P.NBD_REPLY_FLAG_DONE);
    expect(Number(chunk!.payload.readBigUInt64BE(0))).toBe(offset);
    expect(chunk!.payload.subarray(8).equals(contents.subarray(offset, offset + length))).toBe(true);
    expect(calls.map((call) => call.length)).toContain(length);
    client.destroy();
  });

  it('a client leaving in the middle of a large reply leaves the others served', async () => {
    const leaving = await TestClient.connect(socketPath);
    await leaving.open();
    for (let i = 0; i < 4; i++) leaving.request(P.NBD_CMD_READ, i * MiB, 32 * MiB);
    await leaving.reader.read(16);
    leaving.destroy();
    const staying = await TestClient.connect(socketPath);
    await staying.open();
    const cookie = staying.request(P.NBD_CMD_READ, 7 * MiB, 2 * MiB);
    const reply = await staying.simpleReply(2 * MiB);
    expect(reply.cookie).toBe(cookie);
    expect(reply.data.equals(contents.subarray(7 * MiB, 9 * MiB))).toBe(true);
    staying.request(P.NBD_CMD_DISC, 0, 0);
    expect(await staying.closed()).toBe(true);
  });
});
