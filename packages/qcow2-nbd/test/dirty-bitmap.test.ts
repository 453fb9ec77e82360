import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { parseArgs } from '../src/cli/options.js';
import {
  bitmapExtents,
  createNbdServer,
  type DirtyExtent,
  type NbdDirtyBitmap,
  type NbdServer,
  protocol as P,
} from '../src/index.js';
import { descriptors } from './helpers.js';
import { metaContextPayload, TestClient } from './test-client.js';

/** The runs of `bits` over `[offset, end)`, bit by bit (the model). */
function modelRuns(bits: Uint8Array, granularity: number, offset: number, end: number): DirtyExtent[] {
  const out: DirtyExtent[] = [];
  for (let position = offset; position < end; ) {
    const bit = Math.floor(position / granularity);
    const dirty = (bits[bit >> 3]! & (1 << (bit & 7))) !== 0;
    const next = Math.min(end, (bit + 1) * granularity);
    const previous = out[out.length - 1];
    if (previous?.dirty === dirty) out[out.length - 1] = { length: previous.length + next - position, dirty };
    else out.push({ length: next - position, dirty });
    position = next;
  }
  return out;
}

describe('bitmapExtents', () => {
  it('gives the maximal runs of the bits over any range, as a bit-by-bit walk', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 1, maxLength: 40 }).map((bytes) =>
          // Runs of whole 0x00 and 0xff bytes too, which the scan skips a byte at a time.
          bytes.map((byte) => (byte % 3 === 0 ? 0 : byte % 3 === 1 ? 0xff : byte)),
        ),
        fc.constantFrom(512, 4096, 65536),
        fc.nat(),
        fc.nat(),
        fc.integer({ min: 1, max: 8 }),
        (bits, granularity, a, b, limit) => {
          const bitCount = bits.length * 8 - (a % 8);
          const size = bitCount * granularity - (b % granularity);
          const offset = a % size;
          const end = offset + 1 + (b % (size - offset));
          const model = modelRuns(bits, granularity, offset, end);
          expect(bitmapExtents({ bits, bitCount, granularity }, offset, end, 1e9)).toEqual(model);
          expect(bitmapExtents({ bits, bitCount, granularity }, offset, end, limit)).toEqual(
            model.slice(0, limit),
          );
        },
      ),
    );
  });

  it('stops where a window into a larger bitmap ends', () => {
    const window = { bits: Uint8Array.of(0b11110000), firstBit: 8, bitCount: 8, granularity: 512 };
    expect(bitmapExtents(window, 8 * 512 + 100, 100 * 512, 10)).toEqual([
      { length: 4 * 512 - 100, dirty: false },
      { length: 4 * 512, dirty: true },
    ]);
    expect(bitmapExtents(window, 0, 100, 10)).toEqual([]);
  });
});

describe('-B/--bitmap', () => {
  it('is repeatable and kept in command-line order', () => {
    const parsed = parseArgs(['-B', 'a', '--bitmap', 'b', '--bitmap=c', 'img'], '0');
    expect(parsed.kind === 'run' && parsed.options.bitmaps).toEqual(['a', 'b', 'c']);
    const none = parseArgs(['img'], '0');
    expect(none.kind === 'run' && none.options.bitmaps).toEqual([]);
  });
});

describe('qemu:dirty-bitmap meta contexts', () => {
  const SIZE = 1024 * 1024;
  let dir: string;
  let server: NbdServer;
  let socketPath: string;
  let device: MemoryBlockDevice;
  let statusCalls: number;
  let asked: [number, number, number][];

  /** A library author's bitmap: 64 KiB granularity, dirty where `dirty` says, runs of one bit. */
  function source(name: string, dirty: (bit: number) => boolean): NbdDirtyBitmap {
    return {
      name,
      extents: async (offset, length, limit) => {
        asked.push([offset, length, limit]);
        const out: DirtyExtent[] = [];
        for (let position = offset; position < offset + length && out.length < limit; ) {
          const next = Math.min(offset + length, (Math.floor(position / 65536) + 1) * 65536);
          out.push({ length: next - position, dirty: dirty(Math.floor(position / 65536)) });
          position = next;
        }
        return out;
      },
    };
  }

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-bitmap-'));
    socketPath = join(dir, 'nbd.sock');
    device = new MemoryBlockDevice(SIZE);
    statusCalls = 0;
    asked = [];
    // The device, counting its blockStatus calls.
    const counted = new Proxy(device, {
      get(target, key) {
        if (key === 'blockStatus') {
          return (offset: number, length: number) => {
            statusCalls++;
            return target.blockStatus(offset, length);
          };
        }
        const value = Reflect.get(target, key, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    server = createNbdServer({
      exports: [
        {
          name: 'disk',
          device: counted,
          allocationDepth: true,
          dirtyBitmaps: [
            source('odd', (bit) => bit % 2 === 1),
            source('low', (bit) => bit < 4),
            {
              name: 'broken',
              extents: async (_offset, length) => [{ length: length + 1, dirty: true }],
            },
          ],
        },
        { name: 'plain', device },
      ],
      log: () => {},
    });
    await server.listen({ path: socketPath });
  });

  afterEach(async () => {
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function listed(client: TestClient, exportName: string, queries: string[]): Promise<string[]> {
    client.sendOption(P.NBD_OPT_LIST_META_CONTEXT, metaContextPayload(exportName, queries));
    const replies = await client.optionReplies();
    expect(replies.at(-1)!.type).toBe(P.NBD_REP_ACK);
    return replies.filter((r) => r.type === P.NBD_REP_META_CONTEXT).map((r) => r.data.subarray(4).toString());
  }

  it('lists them as qemu-nbd does for every kind of query', async () => {
    const client = await TestClient.connect(socketPath);
    await client.greeting();
    client.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    await client.optionReplies();
    const all = ['qemu:dirty-bitmap:odd', 'qemu:dirty-bitmap:low', 'qemu:dirty-bitmap:broken'];
    expect(await listed(client, 'disk', [])).toEqual(['base:allocation', 'qemu:allocation-depth', ...all]);
    expect(await listed(client, 'disk', ['qemu:'])).toEqual(['qemu:allocation-depth', ...all]);
    expect(await listed(client, 'disk', ['qemu:dirty-bitmap:'])).toEqual(all);
    expect(await listed(client, 'disk', ['qemu:dirty-bitmap:low', 'qemu:dirty-bitmap:low'])).toEqual([
      'qemu:dirty-bitmap:low',
    ]);
    expect(await listed(client, 'disk', ['qemu:dirty-bitmap:nope', 'qemu:dirty-bitmap'])).toEqual([]);
    expect(await listed(client, 'plain', ['qemu:dirty-bitmap:'])).toEqual([]);
    // SET takes exact names only: a namespace selects nothing.
    client.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaContextPayload('disk', ['qemu:dirty-bitmap:']));
    expect((await client.optionReplies()).map((r) => r.type)).toEqual([P.NBD_REP_ACK]);
    client.destroy();
  });

  it('answers BLOCK_STATUS with merged runs, REQ_ONE with one, without walking the device', async () => {
    const client = await TestClient.connect(socketPath);
    await client.open({
      structured: true,
      name: 'disk',
      contexts: ['qemu:dirty-bitmap:low', 'qemu:dirty-bitmap:odd'],
    });
    client.request(P.NBD_CMD_BLOCK_STATUS, 100_000, 300_000);
    const chunks = await client.chunks();
    expect(chunks.map((c) => c.type)).toEqual([P.NBD_REPLY_TYPE_BLOCK_STATUS, P.NBD_REPLY_TYPE_BLOCK_STATUS]);
    // The contexts' ids as SET_META_CONTEXT gave them: low is the export's second bitmap.
    const byId = new Map(chunks.map((c) => [c.payload.readUInt32BE(0), descriptors(c.payload)]));
    expect(byId.get(4)).toEqual([
      [4 * 65536 - 100_000, P.NBD_STATE_DIRTY],
      [400_000 - 4 * 65536, 0],
    ]);
    expect(byId.get(3)).toEqual([
      [2 * 65536 - 100_000, P.NBD_STATE_DIRTY],
      [65536, 0],
      [65536, 1],
      [65536, 0],
      [65536, 1],
      [400_000 - 6 * 65536, 0],
    ]);
    client.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE, { flags: P.NBD_CMD_FLAG_REQ_ONE });
    const one = await client.chunks();
    // One descriptor a context, each from its own source (low: bit 0 dirty; odd: bit 0 clean).
    expect(one.map((c) => descriptors(c.payload))).toEqual([[[65536, 1]], [[65536, 0]]]);
    expect(asked.at(-1)![2]).toBe(1);
    expect(statusCalls).toBe(0);
    client.destroy();
  });

  it('replies with an error chunk when a source returns runs past the range', async () => {
    const client = await TestClient.connect(socketPath);
    await client.open({ structured: true, name: 'disk', contexts: ['qemu:dirty-bitmap:broken'] });
    client.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096);
    const chunks = await client.chunks();
    expect(chunks.map((c) => c.type)).toEqual([P.NBD_REPLY_TYPE_ERROR]);
    client.destroy();
  });
});
