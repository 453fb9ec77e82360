/**
 * Transmission replies: simple replies and structured reply chunks. Encoders that carry data
 * allocate the header and the data in one buffer, so a READ reply is one socket write and the
 * device reads straight into it.
 */
import {
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  SIMPLE_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
} from './constants.js';

/** Where encoders get their buffers (a pool for large ones). */
export type Allocate = (size: number) => Buffer;
const allocate: Allocate = (size) => Buffer.allocUnsafe(size);

/** A simple reply; with `dataLength` the buffer has room for the data after the header. */
export function encodeSimpleReply(cookie: bigint, error: number, dataLength = 0, alloc = allocate): Buffer {
  const out = alloc(SIMPLE_REPLY_HEADER_SIZE + dataLength);
  out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  out.writeBigUInt64BE(cookie, 8);
  return out;
}

function chunkHeader(out: Buffer, cookie: bigint, flags: number, type: number, length: number): void {
  out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(cookie, 8);
  out.writeUInt32BE(length, 16);
}

/** NBD_REPLY_TYPE_NONE with DONE: the end of a structured reply with nothing more to say. */
export function encodeNoneChunk(cookie: bigint): Buffer {
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
  chunkHeader(out, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
  return out;
}

/** Byte position of the data in an OFFSET_DATA chunk made by encodeOffsetDataChunk. */
export const OFFSET_DATA_PAYLOAD_START = STRUCTURED_REPLY_HEADER_SIZE + 8;

/** An OFFSET_DATA chunk with room for `dataLength` bytes at OFFSET_DATA_PAYLOAD_START. */
export function encodeOffsetDataChunk(
  cookie: bigint,
  done: boolean,
  offset: number,
  dataLength: number,
  alloc = allocate,
): Buffer {
  const out = alloc(OFFSET_DATA_PAYLOAD_START + dataLength);
  chunkHeader(out, cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength);
  out.writeBigUInt64BE(BigInt(offset), STRUCTURED_REPLY_HEADER_SIZE);
  return out;
}

export function encodeOffsetHoleChunk(cookie: bigint, done: boolean, offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 12);
  chunkHeader(out, cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
  out.writeBigUInt64BE(BigInt(offset), STRUCTURED_REPLY_HEADER_SIZE);
  out.writeUInt32BE(length, STRUCTURED_REPLY_HEADER_SIZE + 8);
  return out;
}

export interface BlockStatusDescriptor {
  readonly length: number;
  readonly status: number;
}

export function encodeBlockStatusChunk(
  cookie: bigint,
  done: boolean,
  contextId: number,
  descriptors: readonly BlockStatusDescriptor[],
): Buffer {
  const payloadLength = 4 + 8 * descriptors.length;
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payloadLength);
  chunkHeader(out, cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, payloadLength);
  let position = STRUCTURED_REPLY_HEADER_SIZE;
  out.writeUInt32BE(contextId, position);
  position += 4;
  for (const descriptor of descriptors) {
    out.writeUInt32BE(descriptor.length, position);
    out.writeUInt32BE(descriptor.status >>> 0, position + 4);
    position += 8;
  }
  return out;
}

/** NBD_REPLY_TYPE_ERROR with DONE: error number and a message. */
export function encodeErrorChunk(cookie: bigint, error: number, message: string): Buffer {
  let text = Buffer.from(message, 'utf8');
  if (text.length > 4096) text = text.subarray(0, 4096);
  const payloadLength = 6 + text.length;
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payloadLength);
  chunkHeader(out, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, payloadLength);
  out.writeUInt32BE(error, STRUCTURED_REPLY_HEADER_SIZE);
  out.writeUInt16BE(text.length, STRUCTURED_REPLY_HEADER_SIZE + 4);
  text.copy(out, STRUCTURED_REPLY_HEADER_SIZE + 6);
  return out;
}
