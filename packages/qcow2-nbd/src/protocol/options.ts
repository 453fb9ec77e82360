/**
 * Codecs of the handshake phase: the server greeting, option replies, info replies, and decoders
 * of the option payloads a client sends. Decoders validate strictly and throw OptionDecodeError,
 * which the handshake answers with NBD_REP_ERR_INVALID.
 */
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_MAX_STRING_SIZE,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  OPTION_REPLY_HEADER_SIZE,
} from './constants.js';

export class OptionDecodeError extends Error {
  override name = 'OptionDecodeError';
}

/** The 18-byte server greeting of the fixed newstyle handshake. */
export function encodeGreeting(): Buffer {
  const out = Buffer.alloc(18);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  out.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  return out;
}

/** A client option header: IHAVEOPT, option, length. */
export interface OptionHeader {
  readonly magic: bigint;
  readonly option: number;
  readonly length: number;
}

export function decodeOptionHeader(bytes: Buffer): OptionHeader {
  return { magic: bytes.readBigUInt64BE(0), option: bytes.readUInt32BE(8), length: bytes.readUInt32BE(12) };
}

/** An option reply with an optional payload. */
export function encodeOptionReply(option: number, replyType: number, payload?: Uint8Array): Buffer {
  const length = payload?.length ?? 0;
  const out = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + length);
  out.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(replyType >>> 0, 12);
  out.writeUInt32BE(length, 16);
  if (payload !== undefined) out.set(payload, OPTION_REPLY_HEADER_SIZE);
  return out;
}

/** An error reply carrying a human-readable message. */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, Buffer.from(truncateString(message), 'utf8'));
}

/** NBD_REP_SERVER for NBD_OPT_LIST: name, then description. */
export function encodeServerReply(option: number, name: string, description: string): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const descriptionBytes = Buffer.from(description, 'utf8');
  const payload = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  payload.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(payload, 4);
  descriptionBytes.copy(payload, 4 + nameBytes.length);
  return encodeOptionReply(option, NBD_REP_SERVER, payload);
}

export function encodeInfoExport(option: number, size: number, transmissionFlags: number): Buffer {
  const payload = Buffer.allocUnsafe(12);
  payload.writeUInt16BE(NBD_INFO_EXPORT, 0);
  payload.writeBigUInt64BE(BigInt(size), 2);
  payload.writeUInt16BE(transmissionFlags, 10);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

export function encodeInfoString(option: number, infoType: number, value: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  const payload = Buffer.allocUnsafe(2 + bytes.length);
  payload.writeUInt16BE(infoType, 0);
  bytes.copy(payload, 2);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

export function encodeInfoName(option: number, name: string): Buffer {
  return encodeInfoString(option, NBD_INFO_NAME, name);
}

export function encodeInfoDescription(option: number, description: string): Buffer {
  return encodeInfoString(option, NBD_INFO_DESCRIPTION, description);
}

export function encodeInfoBlockSize(
  option: number,
  minimum: number,
  preferred: number,
  maximum: number,
): Buffer {
  const payload = Buffer.allocUnsafe(14);
  payload.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  payload.writeUInt32BE(minimum, 2);
  payload.writeUInt32BE(preferred, 6);
  payload.writeUInt32BE(maximum, 10);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

export function encodeMetaContextReply(option: number, contextId: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const payload = Buffer.allocUnsafe(4 + bytes.length);
  payload.writeUInt32BE(contextId, 0);
  bytes.copy(payload, 4);
  return encodeOptionReply(option, NBD_REP_META_CONTEXT, payload);
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeros unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const out = Buffer.alloc(noZeroes ? 10 : 134);
  out.writeBigUInt64BE(BigInt(size), 0);
  out.writeUInt16BE(transmissionFlags, 8);
  return out;
}

/** Payload of NBD_OPT_INFO and NBD_OPT_GO. */
export interface InfoRequest {
  readonly name: string;
  readonly infoTypes: readonly number[];
}

export function decodeInfoRequest(payload: Buffer): InfoRequest {
  const cursor = new Cursor(payload);
  const name = cursor.string('export name');
  const count = cursor.u16('information request count');
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(cursor.u16('information request'));
  cursor.end();
  return { name, infoTypes };
}

/** Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
export interface MetaContextRequest {
  readonly exportName: string;
  readonly queries: readonly string[];
}

export function decodeMetaContextRequest(payload: Buffer): MetaContextRequest {
  const cursor = new Cursor(payload);
  const exportName = cursor.string('export name');
  const count = cursor.u32('query count');
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(cursor.string('query'));
  cursor.end();
  return { exportName, queries };
}

function truncateString(value: string): string {
  const bytes = Buffer.from(value, 'utf8');
  return bytes.length <= NBD_MAX_STRING_SIZE
    ? value
    : bytes.subarray(0, NBD_MAX_STRING_SIZE).toString('utf8');
}

class Cursor {
  private position = 0;
  constructor(private readonly bytes: Buffer) {}

  private need(n: number, what: string): void {
    if (this.bytes.length - this.position < n) {
      throw new OptionDecodeError(`${what}: option payload too short (at 0x${this.position.toString(16)})`);
    }
  }

  u16(what: string): number {
    this.need(2, what);
    const value = this.bytes.readUInt16BE(this.position);
    this.position += 2;
    return value;
  }

  u32(what: string): number {
    this.need(4, what);
    const value = this.bytes.readUInt32BE(this.position);
    this.position += 4;
    return value;
  }

  string(what: string): string {
    const length = this.u32(`${what} length`);
    if (length > NBD_MAX_STRING_SIZE) {
      throw new OptionDecodeError(`${what}: ${length} bytes is longer than ${NBD_MAX_STRING_SIZE}`);
    }
    this.need(length, what);
    const bytes = this.bytes.subarray(this.position, this.position + length);
    this.position += length;
    if (bytes.includes(0)) throw new OptionDecodeError(`${what}: contains a NUL byte`);
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      throw new OptionDecodeError(`${what}: not valid UTF-8`);
    }
  }

  end(): void {
    if (this.position !== this.bytes.length) {
      throw new OptionDecodeError(
        `option payload: ${this.bytes.length - this.position} trailing bytes (at 0x${this.position.toString(16)})`,
      );
    }
  }
}
