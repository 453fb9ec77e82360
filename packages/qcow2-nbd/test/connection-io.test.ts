import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { protocol as P } from '../src/index.js';
import { ByteReader } from '../src/protocol/byte-reader.js';
import { ConnectionIo } from '../src/server/connection-io.js';
import { RequestReader, type RequestSink } from '../src/server/request-reader.js';

/** A ConnectionIo over one end of a unix socket, and a reader of the other end. */
async function socketPair(): Promise<{ io: ConnectionIo; peer: ByteReader; close: () => void }> {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-io-'));
  const path = join(dir, 'io.sock');
  let accept!: (socket: Socket) => void;
  const accepted = new Promise<Socket>((resolve) => {
    accept = resolve;
  });
  const server = createServer((socket) => {
    server.close();
    accept(socket);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const client = connect(path);
  const socket = await accepted;
  return {
    io: new ConnectionIo(socket),
    peer: new ByteReader(client),
    close: () => {
      client.destroy();
      socket.destroy();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

describe('ConnectionIo', () => {
  it('sends replies in order, releasing a buffer only once it is copied or written', async () => {
    const { io, peer, close } = await socketPair();
    const small = Buffer.alloc(100, 1);
    const large = Buffer.alloc(20_000, 2);
    const last = Buffer.alloc(50, 3);
    const lone = Buffer.alloc(30, 4);
    const released: string[] = [];
    // A released buffer is reused at once: scribbling over it shows any early release.
    const release = (name: string, buffer: Buffer) => () => {
      released.push(name);
      buffer.fill(9);
    };
    io.send(small, release('small', small));
    io.send(large, release('large', large));
    io.send(last, release('last', last));
    io.send(lone); // no callback: nothing to release
    const received = await peer.read(100 + 20_000 + 50 + 30);
    const expected = Buffer.concat([
      Buffer.alloc(100, 1),
      Buffer.alloc(20_000, 2),
      Buffer.alloc(50, 3),
      Buffer.alloc(30, 4),
    ]);
    expect(received.equals(expected)).toBe(true);
    await io.drained();
    expect(released.sort()).toEqual(['large', 'last', 'small']);
    expect(io.pendingBytes).toBe(0);
    close();
  });

  it('joins many small replies of one turn into one write', async () => {
    const stream = new PassThrough();
    let writes = 0;
    const write = stream.write.bind(stream);
    stream.write = ((...args: Parameters<typeof write>) => {
      writes++;
      return write(...args);
    }) as typeof stream.write;
    const io = new ConnectionIo(stream as unknown as Socket);
    for (let i = 0; i < 16; i++) io.send(Buffer.alloc(4128, i));
    const received = await io.reader.read(16 * 4128);
    for (let i = 0; i < 16; i++) expect(received[i * 4128 + 4127]).toBe(i);
    expect(writes).toBe(1);
  });
});

describe('ConnectionIo.startRequests', () => {
  it.each(['direct', 'stream'] as const)(
    'frames every byte that arrived during the handshake, including what waits in the socket (%s)',
    async (mode) => {
      const { io, client, socket, close } = await rawPair();
      // More than the handshake's reader buffers before it pauses the socket (1 MiB).
      const count = 48;
      const payload = (index: number) => Buffer.alloc(65536, index + 1);
      for (let i = 0; i < count; i++) {
        client.write(
          P.encodeRequestHeader({
            magic: P.NBD_REQUEST_MAGIC,
            flags: 0,
            type: P.NBD_CMD_WRITE,
            cookie: BigInt(i),
            offset: i * 65536,
            length: 65536,
          }),
        );
        client.write(payload(i));
      }
      // Wait until the paused socket itself holds bytes the handshake's reader has not taken.
      while (socket.readableLength === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      const got: { cookie: bigint; payload: Buffer }[] = [];
      let all!: () => void;
      const done = new Promise<void>((resolve) => {
        all = resolve;
      });
      const sink: RequestSink = {
        header: (request) => request.length,
        request: (request, bytes) => {
          got.push({ cookie: request.cookie, payload: Buffer.from(bytes!) });
          if (got.length === count) all();
          return true;
        },
      };
      await io.drained();
      // An accepted plain socket is rewrapped for direct reads when they are asked for.
      expect(io.startRequests(new RequestReader(sink, (size) => Buffer.alloc(size)), () => {}, mode)).toBe(
        mode,
      );
      await done;
      got.forEach((request, index) => {
        expect(request.cookie).toBe(BigInt(index));
        expect(request.payload.equals(payload(index))).toBe(true);
      });
      close();
    },
  );
});

describe('ConnectionIo.startRequests failures', () => {
  it.each(['direct', 'stream'] as const)(
    'ends only the connection when handling a request throws (%s)',
    async (mode) => {
      const { io, client, close } = await rawPair();
      const sink: RequestSink = {
        header: () => 0,
        request: () => {
          throw new Error('sink broke');
        },
      };
      let ended!: () => void;
      const end = new Promise<void>((resolve) => {
        ended = resolve;
      });
      await io.drained();
      io.startRequests(new RequestReader(sink, (size) => Buffer.alloc(size)), () => ended(), mode);
      client.write(
        P.encodeRequestHeader({
          magic: P.NBD_REQUEST_MAGIC,
          flags: 0,
          type: P.NBD_CMD_FLUSH,
          cookie: 1n,
          offset: 0,
          length: 0,
        }),
      );
      await end;
      expect(io.isClosed).toBe(true);
      close();
    },
  );
});

describe('ConnectionIo.startRequests fallback', () => {
  it('reads stream chunks when direct reads were asked for a stream that is no accepted socket', async () => {
    const stream = new PassThrough();
    const io = new ConnectionIo(stream as unknown as Socket);
    const got: bigint[] = [];
    const sink: RequestSink = {
      header: () => 0,
      request: (request) => {
        got.push(request.cookie);
        return true;
      },
    };
    const header = (cookie: bigint) =>
      P.encodeRequestHeader({
        magic: P.NBD_REQUEST_MAGIC,
        flags: 0,
        type: P.NBD_CMD_FLUSH,
        cookie,
        offset: 0,
        length: 0,
      });
    stream.write(header(1n));
    await new Promise((resolve) => setImmediate(resolve));
    const reader = new RequestReader(sink, (size) => Buffer.alloc(size));
    expect(io.startRequests(reader, () => {}, 'direct')).toBe('stream');
    stream.write(header(2n));
    await new Promise((resolve) => setImmediate(resolve));
    expect(got).toEqual([1n, 2n]);
  });
});

/** A ConnectionIo over a socket accepted by a net.Server (so it can be rewrapped), and the client. */
async function rawPair(): Promise<{ io: ConnectionIo; client: Socket; socket: Socket; close: () => void }> {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-io-'));
  const path = join(dir, 'io.sock');
  let accept!: (socket: Socket) => void;
  const accepted = new Promise<Socket>((resolve) => {
    accept = resolve;
  });
  const server = createServer((socket) => accept(socket));
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const client = connect(path);
  const socket = await accepted;
  const io = new ConnectionIo(socket);
  return {
    io,
    client,
    socket,
    close: () => {
      client.destroy();
      io.destroy();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
