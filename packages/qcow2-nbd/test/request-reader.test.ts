import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { protocol as P } from '../src/index.js';
import { DIRECT_MINIMUM, RequestReader, type RequestSink } from '../src/server/request-reader.js';

interface Wire {
  readonly type: number;
  readonly length: number;
  readonly seed: number;
}

function payloadOf(request: Wire): Buffer {
  const out = Buffer.alloc(request.length);
  for (let i = 0; i < out.length; i++) out[i] = (i * 7 + request.seed) & 0xff;
  return out;
}

/** The bytes a client sends for `requests` (WRITE payloads included). */
function encode(requests: readonly Wire[]): Buffer {
  return Buffer.concat(
    requests.flatMap((request, index) => {
      const header = P.encodeRequestHeader({
        magic: P.NBD_REQUEST_MAGIC,
        flags: 0,
        type: request.type,
        cookie: BigInt(index),
        offset: index * 512,
        length: request.length,
      });
      return request.type === P.NBD_CMD_WRITE ? [header, payloadOf(request)] : [header];
    }),
  );
}

/** A sink recording what it gets; pauses the reader at every `pauseEvery`th request. */
class RecordingSink implements RequestSink {
  readonly got: { cookie: number; type: number; payload: Buffer | undefined }[] = [];
  pauses = 0;
  private refused = new Set<number>();
  constructor(private readonly pauseEvery: number) {}
  header(request: P.RequestHeader): number {
    if (request.magic !== P.NBD_REQUEST_MAGIC) return -1;
    return request.type === P.NBD_CMD_WRITE ? request.length : 0;
  }
  request(request: P.RequestHeader, payload: Buffer | undefined): boolean {
    const cookie = Number(request.cookie);
    if (this.pauseEvery > 0 && cookie % this.pauseEvery === 0 && !this.refused.has(cookie)) {
      // A refused request stays the sink's to serve later (the transmission holds it): recorded.
      this.refused.add(cookie);
      this.pauses++;
      this.got.push({ cookie, type: request.type, payload: payload && Buffer.from(payload) });
      return false;
    }
    this.got.push({ cookie, type: request.type, payload: payload && Buffer.from(payload) });
    return true;
  }
}

const wireRequest = fc.record({
  type: fc.constantFrom(P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH),
  length: fc.oneof(
    fc.integer({ min: 0, max: 600 }),
    fc.integer({ min: DIRECT_MINIMUM - 10, max: DIRECT_MINIMUM * 3 }),
  ),
  seed: fc.integer({ min: 0, max: 255 }),
});

function check(requests: readonly Wire[], sink: RecordingSink): void {
  expect(sink.got.map((g) => g.cookie)).toEqual(requests.map((_, i) => i));
  sink.got.forEach((g, i) => {
    const request = requests[i]!;
    expect(g.type).toBe(request.type);
    // A WRITE of 0 bytes comes without a payload buffer.
    if (request.type === P.NBD_CMD_WRITE)
      expect((g.payload ?? Buffer.alloc(0)).equals(payloadOf(request))).toBe(true);
    else expect(g.payload).toBeUndefined();
  });
}

describe('RequestReader', () => {
  it('frames any request stream fed in any chunks, pausing and resuming', () => {
    fc.assert(
      fc.property(
        fc.array(wireRequest, { maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 40_000 }), { minLength: 1, maxLength: 8 }),
        fc.integer({ min: 0, max: 3 }),
        (requests, cuts, pauseEvery) => {
          const bytes = encode(requests);
          const sink = new RecordingSink(pauseEvery);
          const reader = new RequestReader(sink, (size) => Buffer.alloc(size));
          let position = 0;
          let cut = 0;
          while (position < bytes.length) {
            const size = Math.min(cuts[cut++ % cuts.length]!, bytes.length - position);
            // A copy, as a stream's chunk is its own buffer.
            let accepting = reader.feed(Buffer.from(bytes.subarray(position, position + size)));
            position += size;
            while (!accepting) accepting = reader.resume();
          }
          check(requests, sink);
        },
      ),
      { numRuns: 150 },
    );
  });

  it('receives into the buffers it names: staging for headers, the payload itself for large parts', () => {
    fc.assert(
      fc.property(
        fc.array(wireRequest, { maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 70_000 }), { minLength: 1, maxLength: 8 }),
        fc.integer({ min: 0, max: 3 }),
        (requests, cuts, pauseEvery) => {
          const bytes = encode(requests);
          const sink = new RecordingSink(pauseEvery);
          const payloads = new Set<ArrayBufferLike>();
          const reader = new RequestReader(sink, (size) => {
            const payload = Buffer.alloc(size);
            payloads.add(payload.buffer);
            return payload;
          });
          let position = 0;
          let cut = 0;
          let direct = 0;
          while (position < bytes.length) {
            // As a socket read: at most the buffer's length, at most what the peer has sent.
            const target = reader.nextBuffer();
            expect(target.length).toBeGreaterThan(0);
            if (payloads.has(target.buffer)) direct++;
            const size = Math.min(cuts[cut++ % cuts.length]!, bytes.length - position, target.length);
            target.set(bytes.subarray(position, position + size));
            position += size;
            let accepting = reader.received(target, size);
            while (!accepting) accepting = reader.resume();
          }
          check(requests, sink);
          const large = requests.some((r) => r.type === P.NBD_CMD_WRITE && r.length >= DIRECT_MINIMUM * 2);
          if (large && cuts.every((c) => c < DIRECT_MINIMUM)) expect(direct).toBeGreaterThan(0);
        },
      ),
      { numRuns: 150 },
    );
  });

  it('stops at a header the sink refuses, then drops what follows', () => {
    const sink = new RecordingSink(0);
    const reader = new RequestReader(sink, (size) => Buffer.alloc(size));
    const good = encode([{ type: P.NBD_CMD_READ, length: 512, seed: 0 }]);
    const bad = Buffer.from(good);
    bad.writeUInt32BE(0xdeadbeef, 0);
    expect(reader.feed(Buffer.concat([good, bad, good]))).toBe(true);
    expect(reader.isStopped).toBe(true);
    expect(sink.got.map((g) => g.cookie)).toEqual([0]);
    expect(reader.feed(good)).toBe(true);
    expect(sink.got).toHaveLength(1);
  });
});
