/**
 * RequestReader's placed WRITEs (RequestSink.placeWrite): a large payload goes to the file and
 * offset the sink names, partly from the staging buffer (written at once) and partly moved by the
 * splicer from the socket behind the reader's buffers. The socket here is a model: bytes the
 * client has sent and the reader (or the splicer) has not taken yet; the splicer is a fake that
 * takes from the same model and writes into a real file.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { protocol as P } from '../src/index.js';
import {
  DIRECT_MINIMUM,
  type FilePlacement,
  PLACE_MINIMUM,
  RequestReader,
  type RequestSink,
} from '../src/server/request-reader.js';
import type { SocketSplicer, SpliceResult } from '../src/server/socket-splice.js';

const STAGING = 32 * 1024;
const PROBE = 4096;
const HEADER = 28;
const FAKE_SOCKET_FD = 1_000_001;
/** Each request's payload has its own region of the file. */
const REGION = 320 * 1024;
const MAX_REQUESTS = 10;

let dir: string;
let filePath: string;
let fileFd: number;
/** The same file opened read-only: writes through it fail (EBADF). */
let readOnlyFd: number;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-place-'));
  filePath = join(dir, 'disk.raw');
  writeFileSync(filePath, Buffer.alloc(REGION * MAX_REQUESTS));
  fileFd = openSync(filePath, 'r+');
  readOnlyFd = openSync(filePath, 'r');
});
afterAll(() => {
  closeSync(fileFd);
  closeSync(readOnlyFd);
  rmSync(dir, { recursive: true, force: true });
});

function clearFile(): void {
  writeSync(fileFd, Buffer.alloc(REGION * MAX_REQUESTS), 0, REGION * MAX_REQUESTS, 0);
}

interface Wire {
  readonly type: number;
  readonly length: number;
  readonly seed: number;
  /** The sink's answer to placeWrite for this request: the file, a failing file, or no. */
  readonly place?: 'file' | 'failing' | 'no';
}

function payloadOf(request: Wire, index: number): Buffer {
  const out = Buffer.alloc(request.length);
  for (let i = 0; i < out.length; i++) out[i] = (i * 13 + request.seed + index) & 0xff;
  return out;
}

function headerOf(request: Wire, index: number): P.RequestHeader {
  return {
    magic: P.NBD_REQUEST_MAGIC,
    flags: 0,
    type: request.type,
    cookie: BigInt(index),
    offset: index * REGION + (request.seed % 7),
    length: request.length,
  };
}

/** The client's bytes, and where each request ends in them. */
function encode(requests: readonly Wire[]): { bytes: Buffer; ends: number[]; payloadStarts: number[] } {
  const parts: Buffer[] = [];
  const ends: number[] = [];
  const payloadStarts: number[] = [];
  let position = 0;
  requests.forEach((request, index) => {
    parts.push(P.encodeRequestHeader(headerOf(request, index)));
    position += HEADER;
    payloadStarts.push(position);
    if (request.type === P.NBD_CMD_WRITE) {
      parts.push(payloadOf(request, index));
      position += request.length;
    }
    ends.push(position);
  });
  return { bytes: Buffer.concat(parts), ends, payloadStarts };
}

/** The socket: what the client has sent, what has been taken from it. */
class ModelSocket {
  arrived = 0;
  taken = 0;
  constructor(readonly bytes: Buffer) {}
  get available(): number {
    return this.arrived - this.taken;
  }
  arrive(count: number): void {
    this.arrived = Math.min(this.bytes.length, this.arrived + count);
  }
  /** A read into `buffer`: at most its length, at most what has arrived. */
  read(buffer: Uint8Array): number {
    const count = Math.min(buffer.length, this.available);
    buffer.set(this.bytes.subarray(this.taken, this.taken + count));
    this.taken += count;
    return count;
  }
}

/** A splicer over the model socket: takes up to `cap` bytes a call and writes them with pwrite. */
class FakeSplicer implements SocketSplicer {
  calls = 0;
  moved = 0;
  constructor(
    private readonly socket: ModelSocket,
    private readonly cap = Number.POSITIVE_INFINITY,
    /** The call (1, 2, ...) at which the file refuses the bytes taken (as a full file would). */
    private readonly failingCall = 0,
  ) {}
  move(socketFd: number, fd: number, fileOffset: number, length: number): SpliceResult {
    expect(socketFd).toBe(FAKE_SOCKET_FD);
    expect(length).toBeGreaterThan(0);
    this.calls++;
    const count = Math.min(length, this.socket.available, this.cap);
    const start = this.socket.taken;
    this.socket.taken += count;
    if (this.calls === this.failingCall) {
      return { taken: count, stopped: 'file', errno: 'ENOSPC' };
    }
    try {
      let written = 0;
      while (written < count) {
        written += writeSync(fd, this.socket.bytes, start + written, count - written, fileOffset + written);
      }
    } catch (error) {
      return { taken: count, stopped: 'file', errno: (error as NodeJS.ErrnoException).code ?? 'EIO' };
    }
    this.moved += count;
    return { taken: count, stopped: count === length ? 'done' : 'again' };
  }
}

type Event =
  | { kind: 'request'; cookie: number; payload: Buffer | undefined }
  | { kind: 'placed'; cookie: number; error: Error | undefined };

/** A sink that places what its wire requests say, recording every answer. */
class PlacingSink implements RequestSink {
  readonly events: Event[] = [];
  readonly offered: number[] = [];
  /** A placement begun and not yet answered (`placed`), and whether it goes to a failing file. */
  open: { cookie: number; failing: boolean } | undefined;
  /** The last header seen was placed. */
  lastPlaced = false;
  pauses = 0;
  private refused = new Set<number>();
  constructor(
    private readonly requests: readonly Wire[],
    private readonly socket: ModelSocket,
    private readonly ends: readonly number[],
    private readonly pauseEvery = 0,
  ) {}
  header(request: P.RequestHeader): number {
    this.lastPlaced = false;
    return request.type === P.NBD_CMD_WRITE ? request.length : 0;
  }
  request(request: P.RequestHeader, payload: Buffer | undefined): boolean {
    const cookie = Number(request.cookie);
    // A refused request stays the sink's to serve later (as the transmission holds it): recorded.
    this.events.push({ kind: 'request', cookie, payload: payload && Buffer.from(payload) });
    if (this.pauseEvery > 0 && cookie % this.pauseEvery === 0 && !this.refused.has(cookie)) {
      this.refused.add(cookie);
      this.pauses++;
      return false;
    }
    return true;
  }
  placeWrite(request: P.RequestHeader): FilePlacement | undefined {
    const cookie = Number(request.cookie);
    expect(request.length).toBeGreaterThanOrEqual(PLACE_MINIMUM);
    expect(this.open).toBeUndefined();
    this.offered.push(cookie);
    const place = this.requests[cookie]!.place ?? 'file';
    if (place === 'no') return undefined;
    this.open = { cookie, failing: place === 'failing' };
    this.lastPlaced = true;
    return { fd: place === 'failing' ? readOnlyFd : fileFd, offset: request.offset, name: 'the test file' };
  }
  placed(request: P.RequestHeader, error: Error | undefined): void {
    const cookie = Number(request.cookie);
    expect(this.open?.cookie).toBe(cookie);
    this.open = undefined;
    // Answered only once the whole payload has left the socket.
    expect(this.socket.taken).toBeGreaterThanOrEqual(this.ends[cookie]!);
    this.events.push({ kind: 'placed', cookie, error });
  }
}

/** A fresh file, the requests' bytes in a model socket, the recording sink and a reader over them. */
function setUp(requests: readonly Wire[]) {
  clearFile();
  const { bytes, ends } = encode(requests);
  const socket = new ModelSocket(bytes);
  const sink = new PlacingSink(requests, socket, ends);
  const reader = new RequestReader(sink, (size) => Buffer.alloc(size));
  return { bytes, ends, socket, sink, reader };
}

/** Lets every byte arrive and reads until none is left; the size of each buffer read into. */
function readAll(reader: RequestReader, socket: ModelSocket, afterRead?: () => void): number[] {
  socket.arrive(socket.bytes.length);
  const sizes: number[] = [];
  while (socket.available > 0) {
    const buffer = reader.nextBuffer();
    sizes.push(buffer.length);
    reader.received(buffer, socket.read(buffer));
    afterRead?.();
  }
  return sizes;
}

/**
 * Reads the model socket as ConnectionIo does (nextBuffer, then received), `cuts` bytes arriving
 * between reads, checking the size of each buffer the reader asks to be filled.
 */
function drive(
  reader: RequestReader,
  sink: PlacingSink,
  socket: ModelSocket,
  ends: readonly number[],
  cuts: readonly number[],
  payloads: Set<ArrayBufferLike>,
  withSplicer: boolean,
): { sizes: number[] } {
  const boundaries = new Set([0, ...ends]);
  const sizes: number[] = [];
  let cut = 0;
  while (socket.taken < socket.bytes.length) {
    socket.arrive(cuts[cut++ % cuts.length]!);
    while (socket.available > 0) {
      const buffer = reader.nextBuffer();
      sizes.push(buffer.length);
      expect(buffer.length).toBeGreaterThan(0);
      if (withSplicer && sink.open !== undefined && !sink.open.failing) {
        // A placement waits for the socket: a probe, the rest is spliced.
        expect(buffer.length).toBe(PROBE);
      } else if (withSplicer && sink.open === undefined && sink.lastPlaced && boundaries.has(socket.taken)) {
        // Right after a placement: one header, so a next large payload stays in the socket.
        expect(buffer.length).toBe(HEADER);
      } else {
        expect(buffer.length === STAGING || payloads.has(buffer.buffer)).toBe(true);
        if (payloads.has(buffer.buffer)) expect(buffer.length).toBeGreaterThanOrEqual(DIRECT_MINIMUM);
      }
      const count = socket.read(buffer);
      let accepting = reader.received(buffer, count);
      while (!accepting) accepting = reader.resume();
    }
  }
  return { sizes };
}

function checkOutcome(
  requests: readonly Wire[],
  sink: PlacingSink,
  options: { failure?: string } = {},
): void {
  const file = readFileSync(filePath);
  expect(sink.events.map((event) => event.cookie)).toEqual(requests.map((_, index) => index));
  sink.events.forEach((event, index) => {
    const request = requests[index]!;
    const header = headerOf(request, index);
    const placed =
      request.type === P.NBD_CMD_WRITE && request.length >= PLACE_MINIMUM && request.place !== 'no';
    if (placed) {
      expect(event.kind).toBe('placed');
      if (event.kind !== 'placed') return;
      if (request.place === 'failing') {
        // BlockDeviceError codes: a read-only descriptor (EBADF) reads as a closed device.
        expect((event.error as NodeJS.ErrnoException | undefined)?.code).toBe(options.failure ?? 'ECLOSED');
        expect(event.error?.message).toContain('write: the test file:');
      } else {
        expect(event.error).toBeUndefined();
        const landed = file.subarray(header.offset, header.offset + request.length);
        expect(landed.equals(payloadOf(request, index))).toBe(true);
      }
    } else {
      expect(event.kind).toBe('request');
      if (event.kind !== 'request') return;
      if (request.type === P.NBD_CMD_WRITE && request.length > 0) {
        expect(event.payload?.equals(payloadOf(request, index))).toBe(true);
      } else {
        expect(event.payload).toBeUndefined();
      }
    }
  });
  // Only WRITEs of PLACE_MINIMUM bytes or more were offered.
  const large = requests.flatMap((request, index) =>
    request.type === P.NBD_CMD_WRITE && request.length >= PLACE_MINIMUM ? [index] : [],
  );
  expect(sink.offered).toEqual(large);
}

const wireRequest: fc.Arbitrary<Wire> = fc.oneof(
  fc.record({
    type: fc.constantFrom(P.NBD_CMD_READ, P.NBD_CMD_FLUSH),
    length: fc.integer({ min: 0, max: 4096 }),
    seed: fc.nat(255),
  }),
  fc.record({
    type: fc.constant(P.NBD_CMD_WRITE),
    length: fc.oneof(fc.integer({ min: 0, max: 600 }), fc.integer({ min: DIRECT_MINIMUM - 10, max: 40_000 })),
    seed: fc.nat(255),
  }),
  fc.record({
    type: fc.constant(P.NBD_CMD_WRITE),
    length: fc.oneof(
      fc.constantFrom(PLACE_MINIMUM - 1, PLACE_MINIMUM),
      fc.integer({ min: PLACE_MINIMUM, max: 200 * 1024 }),
    ),
    seed: fc.nat(255),
    place: fc.constantFrom('file', 'file', 'file', 'failing', 'no'),
  }),
);

describe('RequestReader placed WRITEs', () => {
  it('any request stream, arriving in any pieces: placed payloads land in the file, the rest is delivered', () => {
    fc.assert(
      fc.property(
        fc.array(wireRequest, { maxLength: MAX_REQUESTS }),
        // Tiny pieces and large ones, at least one large (the runs stay short).
        fc
          .tuple(
            fc.array(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 2000, max: 150_000 })), {
              maxLength: 5,
            }),
            fc.integer({ min: 2000, max: 150_000 }),
          )
          .map(([some, large]) => [...some, large]),
        fc.integer({ min: 0, max: 3 }),
        fc.oneof(fc.constant(Number.POSITIVE_INFINITY), fc.integer({ min: 1, max: 70_000 })),
        fc.boolean(),
        (requests, cuts, pauseEvery, spliceCap, withSplicer) => {
          clearFile();
          const { bytes, ends } = encode(requests);
          const socket = new ModelSocket(bytes);
          const sink = new PlacingSink(requests, socket, ends, pauseEvery);
          const payloads = new Set<ArrayBufferLike>();
          const reader = new RequestReader(sink, (size) => {
            const payload = Buffer.alloc(size);
            payloads.add(payload.buffer);
            return payload;
          });
          const splicer = new FakeSplicer(socket, spliceCap);
          if (withSplicer) reader.useSocket(FAKE_SOCKET_FD, splicer);
          drive(reader, sink, socket, ends, cuts, payloads, withSplicer);
          checkOutcome(requests, sink);
          expect(sink.open).toBeUndefined();
          if (!withSplicer) expect(splicer.calls).toBe(0);
        },
      ),
      { numRuns: 120 },
    );
  });

  it('a payload split across a staged read, probes and splices lands in order; then one header, then staging', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 200 * 1024 + 3, seed: 5 },
      { type: P.NBD_CMD_READ, length: 4096, seed: 0 },
      { type: P.NBD_CMD_FLUSH, length: 0, seed: 0 },
    ];
    const { bytes, ends, socket, sink, reader } = setUp(requests);
    const splicer = new FakeSplicer(socket);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    const step = (arriving: number, expectedSize: number): number => {
      socket.arrive(arriving);
      const buffer = reader.nextBuffer();
      expect(buffer.length).toBe(expectedSize);
      const count = socket.read(buffer);
      expect(reader.received(buffer, count)).toBe(true);
      return count;
    };
    // The header and 1000 payload bytes: staged (written at once), then nothing to splice.
    expect(step(HEADER + 1000, STAGING)).toBe(HEADER + 1000);
    expect(sink.open?.cookie).toBe(0);
    expect(splicer.calls).toBe(1);
    expect(splicer.moved).toBe(0);
    // 10 000 more: a probe takes 4096 of them, the splice the other 5904.
    expect(step(10_000, PROBE)).toBe(PROBE);
    expect(splicer.moved).toBe(5904);
    expect(socket.available).toBe(0);
    // The rest, and the requests after: the splice takes only the payload's end.
    step(bytes.length, PROBE);
    expect(sink.events).toEqual([{ kind: 'placed', cookie: 0, error: undefined }]);
    expect(socket.taken).toBe(ends[0]);
    // Then exactly one header (the READ), then the ordinary staging buffer.
    expect(step(0, HEADER)).toBe(HEADER);
    expect(sink.events.map((event) => event.cookie)).toEqual([0, 1]);
    expect(reader.nextBuffer().length).toBe(STAGING);
    step(0, STAGING);
    checkOutcome(requests, sink);
  });

  it('back-to-back large WRITEs: after the first, the second payload never passes through a buffer', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 100_000, seed: 1 },
      { type: P.NBD_CMD_WRITE, length: 250_000, seed: 2 },
      { type: P.NBD_CMD_WRITE, length: PLACE_MINIMUM, seed: 3 },
    ];
    const { bytes, socket, sink, reader } = setUp(requests);
    const splicer = new FakeSplicer(socket);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    const sizes = readAll(reader, socket);
    // One staged read (the first header and 32 KiB - 28 of its payload), then only headers.
    expect(sizes).toEqual([STAGING, HEADER, HEADER]);
    expect(splicer.moved).toBe(bytes.length - STAGING - 2 * HEADER);
    checkOutcome(requests, sink);
  });

  it('a socket that refuses splice (not EAGAIN) is read from then on; the payloads still land', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 100_000, seed: 4 },
      { type: P.NBD_CMD_WRITE, length: 90_000, seed: 5 },
    ];
    const { socket, sink, reader } = setUp(requests);
    let calls = 0;
    const refusing: SocketSplicer = {
      move: () => {
        calls++;
        return { taken: 0, stopped: 'socket', errno: 'EINVAL' };
      },
    };
    reader.useSocket(FAKE_SOCKET_FD, refusing);
    const sizes = readAll(reader, socket);
    // Tried once; then no probes and no one-header reads, only the staging buffer.
    expect(calls).toBe(1);
    expect(sizes.every((size) => size === STAGING)).toBe(true);
    checkOutcome(requests, sink);
  });

  it('a placement whose file fails is answered with the error after its whole payload; the next request is intact', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 150_000, seed: 9, place: 'failing' },
      { type: P.NBD_CMD_WRITE, length: 300, seed: 4 },
      { type: P.NBD_CMD_READ, length: 512, seed: 0 },
    ];
    const { ends, socket, sink, reader } = setUp(requests);
    const splicer = new FakeSplicer(socket);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    // The staged bytes fail (pwrite to a read-only descriptor): nothing more is spliced, the rest
    // is read into staging and dropped.
    drive(reader, sink, socket, ends, [HEADER + 5000, 7000, 60_000], new Set(), true);
    expect(splicer.calls).toBe(0);
    checkOutcome(requests, sink);
    expect(
      readFileSync(filePath)
        .subarray(0, REGION)
        .every((b) => b === 0),
    ).toBe(true);
  });

  it('a splice that fails mid-payload: the rest is dropped through staging, answered once, stream in step', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 200_000, seed: 6 },
      { type: P.NBD_CMD_WRITE, length: 70_000, seed: 7 },
    ];
    const { bytes, socket, sink, reader } = setUp(requests);
    // 30 000 bytes a call; the second call fails.
    const splicer = new FakeSplicer(socket, 30_000, 2);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    const sizes: number[] = [];
    socket.arrive(bytes.length);
    while (socket.available > 0) {
      const buffer = reader.nextBuffer();
      sizes.push(buffer.length);
      reader.received(buffer, socket.read(buffer));
      if (sink.events.length === 0 && splicer.calls >= 2) {
        // Failed: no more probes, no more splices, staging reads drop the rest.
        expect(reader.nextBuffer().length).toBe(STAGING);
      }
    }
    expect(sink.events[0]).toMatchObject({ kind: 'placed', cookie: 0 });
    const failed = sink.events[0] as { error: NodeJS.ErrnoException };
    expect(failed.error.code).toBe('ENOSPC');
    // The second WRITE was placed too (a new placement starts clean) and landed whole.
    expect(sink.events[1]).toEqual({ kind: 'placed', cookie: 1, error: undefined });
    checkOutcome([{ ...requests[0]!, place: 'failing' }, requests[1]!], sink, { failure: 'ENOSPC' });
    // What came before the failure landed; what followed it did not.
    const file = readFileSync(filePath);
    const start = headerOf(requests[0]!, 0).offset;
    const first = payloadOf(requests[0]!, 0);
    // The staged read, the first splice, the probe read after it (the cap looks like a dry socket).
    const landed = STAGING - HEADER + 30_000 + PROBE;
    expect(file.subarray(start, start + landed).equals(first.subarray(0, landed))).toBe(true);
    expect(file.subarray(start + landed, start + 200_000).every((b) => b === 0)).toBe(true);
  });

  it('stop() in the middle of a placement: nothing more is written, spliced or answered', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 120_000, seed: 8 },
      { type: P.NBD_CMD_READ, length: 512, seed: 0 },
    ];
    const { bytes, socket, sink, reader } = setUp(requests);
    const splicer = new FakeSplicer(socket);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    socket.arrive(HEADER + 10_000);
    let buffer = reader.nextBuffer();
    reader.received(buffer, socket.read(buffer));
    expect(sink.open?.cookie).toBe(0);
    reader.stop();
    expect(reader.isStopped).toBe(true);
    socket.arrive(bytes.length);
    const callsBefore = splicer.calls;
    while (socket.available > 0) {
      buffer = reader.nextBuffer();
      expect(buffer.length).toBe(STAGING);
      expect(reader.received(buffer, socket.read(buffer))).toBe(true);
    }
    expect(splicer.calls).toBe(callsBefore);
    expect(sink.events).toEqual([]);
    const file = readFileSync(filePath);
    const start = headerOf(requests[0]!, 0).offset;
    expect(file.subarray(start, start + 10_000).equals(payloadOf(requests[0]!, 0).subarray(0, 10_000))).toBe(
      true,
    );
    expect(file.subarray(start + 10_000, start + 120_000).every((b) => b === 0)).toBe(true);
  });

  it('a sink without placeWrite, or declining it, gets the payload in a buffer', () => {
    const requests: Wire[] = [
      { type: P.NBD_CMD_WRITE, length: 100_000, seed: 3, place: 'no' },
      { type: P.NBD_CMD_WRITE, length: 80_000, seed: 4, place: 'no' },
    ];
    const { bytes, ends } = encode(requests);
    const socket = new ModelSocket(bytes);
    const sink = new PlacingSink(requests, socket, ends);
    const payloads = new Set<ArrayBufferLike>();
    const reader = new RequestReader(sink, (size) => {
      const payload = Buffer.alloc(size);
      payloads.add(payload.buffer);
      return payload;
    });
    const splicer = new FakeSplicer(socket);
    reader.useSocket(FAKE_SOCKET_FD, splicer);
    const { sizes } = drive(reader, sink, socket, ends, [1_000_000], payloads, false);
    // Received straight into the payloads, as without placement.
    expect(sizes.filter((size) => size !== STAGING).length).toBeGreaterThan(0);
    checkOutcome(requests, sink);
    expect(splicer.calls).toBe(0);
    const got: (Buffer | undefined)[] = [];
    const plain = new RequestReader(
      {
        header: (request) => request.length,
        request: (_request, payload) => {
          got.push(payload);
          return true;
        },
      },
      (size) => Buffer.alloc(size),
    );
    plain.feed(bytes);
    expect(got.map((payload) => payload?.length)).toEqual([100_000, 80_000]);
  });
});
