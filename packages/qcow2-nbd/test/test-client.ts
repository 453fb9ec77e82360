/** A tiny NBD client for tests: speaks the wire format byte by byte, including wrong bytes. */
import { connect, type Socket } from 'node:net';
import { protocol } from '../src/index.js';

const P = protocol;

export interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly data: Buffer;
}

export interface Chunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly payload: Buffer;
}

export class TestClient {
  readonly reader: InstanceType<typeof P.ByteReader>;
  private nextCookie = 1n;

  private constructor(readonly socket: Socket) {
    this.reader = new P.ByteReader(socket);
  }

  static connect(path: string): Promise<TestClient> {
    return new Promise((resolve, reject) => {
      const socket = connect(path, () => resolve(new TestClient(socket)));
      socket.once('error', reject);
    });
  }

  async greeting(clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const greeting = await this.reader.read(18);
    if (greeting.readBigUInt64BE(0) !== P.NBD_MAGIC || greeting.readBigUInt64BE(8) !== P.NBD_IHAVEOPT) {
      throw new Error('bad greeting');
    }
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags);
    this.socket.write(flags);
    return greeting.readUInt16BE(16);
  }

  sendOption(option: number, payload: Uint8Array = Buffer.alloc(0), magic = P.NBD_IHAVEOPT): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(magic, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(payload.length, 12);
    this.socket.write(Buffer.concat([header, payload]));
  }

  async optionReply(): Promise<OptionReply> {
    const header = await this.reader.read(20);
    if (header.readBigUInt64BE(0) !== P.NBD_REP_MAGIC) throw new Error('bad option reply magic');
    const length = header.readUInt32BE(16);
    return {
      option: header.readUInt32BE(8),
      type: header.readUInt32BE(12),
      data: await this.reader.read(length),
    };
  }

  /** Option replies up to and including the ACK or an error. */
  async optionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.optionReply();
      replies.push(reply);
      if (reply.type === P.NBD_REP_ACK || reply.type >= 0x80000000) return replies;
    }
  }

  /** GO with the given export; resolves with size and transmission flags. */
  async go(
    name = '',
    infos: number[] = [],
  ): Promise<{ size: number; flags: number; replies: OptionReply[] }> {
    this.sendOption(P.NBD_OPT_GO, infoPayload(name, infos));
    const replies = await this.optionReplies();
    const info = replies.find((reply) => reply.type === P.NBD_REP_INFO && reply.data.readUInt16BE(0) === 0);
    if (info === undefined) throw new Error(`GO failed: reply type 0x${replies.at(-1)?.type.toString(16)}`);
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10), replies };
  }

  /** Greeting, optional structured replies and meta contexts, then GO. */
  async open(
    options: { structured?: boolean; contexts?: string[]; name?: string } = {},
  ): Promise<{ size: number; flags: number }> {
    await this.greeting();
    if (options.structured) {
      this.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
      await this.optionReplies();
    }
    if (options.contexts !== undefined) {
      this.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaContextPayload(options.name ?? '', options.contexts));
      await this.optionReplies();
    }
    return this.go(options.name ?? '');
  }

  request(
    type: number,
    offset: number,
    length: number,
    options: { flags?: number; data?: Uint8Array; magic?: number } = {},
  ): bigint {
    const cookie = this.nextCookie++;
    const header = P.encodeRequestHeader({
      magic: options.magic ?? P.NBD_REQUEST_MAGIC,
      flags: options.flags ?? 0,
      type,
      cookie,
      offset,
      length,
    });
    this.socket.write(options.data === undefined ? header : Buffer.concat([header, options.data]));
    return cookie;
  }

  /** A simple reply; `dataLength` bytes follow it when it answers a successful READ. */
  async simpleReply(dataLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
    const header = await this.reader.read(16);
    if (header.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error('not a simple reply');
    const error = header.readUInt32BE(4);
    const data = error === 0 && dataLength > 0 ? await this.reader.read(dataLength) : Buffer.alloc(0);
    return { error, cookie: header.readBigUInt64BE(8), data };
  }

  async chunk(): Promise<Chunk> {
    const header = await this.reader.read(20);
    if (header.readUInt32BE(0) !== P.NBD_STRUCTURED_REPLY_MAGIC) throw new Error('not a structured reply');
    const length = header.readUInt32BE(16);
    return {
      flags: header.readUInt16BE(4),
      type: header.readUInt16BE(6),
      cookie: header.readBigUInt64BE(8),
      payload: await this.reader.read(length),
    };
  }

  /** All chunks of one structured reply (up to the DONE flag). */
  async chunks(): Promise<Chunk[]> {
    const out: Chunk[] = [];
    for (;;) {
      const chunk = await this.chunk();
      out.push(chunk);
      if ((chunk.flags & P.NBD_REPLY_FLAG_DONE) !== 0) return out;
    }
  }

  /** Resolves true when the server closes the connection. */
  closed(): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.socket.destroyed || this.socket.readableEnded) resolve(true);
      this.socket.once('close', () => resolve(true));
    });
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export function infoPayload(name: string, infos: number[] = []): Buffer {
  const nameBytes = Buffer.from(name);
  const out = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
  out.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(out, 4);
  out.writeUInt16BE(infos.length, 4 + nameBytes.length);
  for (const [index, info] of infos.entries()) out.writeUInt16BE(info, 6 + nameBytes.length + 2 * index);
  return out;
}

export function metaContextPayload(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (value: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(value);
    return b;
  };
  parts.push(u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length));
  for (const query of queries) parts.push(u32(Buffer.byteLength(query)), Buffer.from(query));
  return Buffer.concat(parts);
}
