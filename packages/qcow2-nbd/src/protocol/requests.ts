/**
 * Transmission requests: the 28-byte header decoder, and the validation of a request against an
 * export (command known, flags allowed for that command, bounds), answering with the NBD error the
 * spec asks for.
 */
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_MAX_PAYLOAD_SIZE,
  REQUEST_HEADER_SIZE,
} from './constants.js';

export interface RequestHeader {
  readonly magic: number;
  readonly flags: number;
  readonly type: number;
  /** The client's cookie (handle), echoed back verbatim. */
  readonly cookie: bigint;
  /** Guest offset; a bigint is avoided: offsets above 2^53 fail validation. */
  readonly offset: number;
  readonly length: number;
}

/**
 * Decodes the request header at byte `at` of `bytes`. Offsets above Number.MAX_SAFE_INTEGER decode
 * as Infinity.
 */
export function decodeRequestHeader(bytes: Uint8Array, at = 0): RequestHeader {
  // Buffer's own readers: no DataView per request (the server's bytes are Buffers already).
  const buffer = Buffer.isBuffer(bytes)
    ? bytes
    : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buffer.length - at < REQUEST_HEADER_SIZE) {
    throw new RangeError(`request header: ${buffer.length - at} bytes, need ${REQUEST_HEADER_SIZE}`);
  }
  const offsetHigh = buffer.readUInt32BE(at + 16);
  const offsetLow = buffer.readUInt32BE(at + 20);
  const offset = offsetHigh >= 0x200000 ? Number.POSITIVE_INFINITY : offsetHigh * 0x100000000 + offsetLow;
  return {
    magic: buffer.readUInt32BE(at),
    flags: buffer.readUInt16BE(at + 4),
    type: buffer.readUInt16BE(at + 6),
    cookie: buffer.readBigUInt64BE(at + 8),
    offset,
    length: buffer.readUInt32BE(at + 24),
  };
}

/** Encodes a request header (used by tests and tools). */
export function encodeRequestHeader(request: RequestHeader): Buffer {
  const out = Buffer.allocUnsafe(28);
  out.writeUInt32BE(request.magic >>> 0, 0);
  out.writeUInt16BE(request.flags, 4);
  out.writeUInt16BE(request.type, 6);
  out.writeBigUInt64BE(request.cookie, 8);
  out.writeBigUInt64BE(BigInt(request.offset), 16);
  out.writeUInt32BE(request.length >>> 0, 24);
  return out;
}

/** What a connection has agreed that matters for validating requests. */
export interface RequestContext {
  readonly size: number;
  readonly readOnly: boolean;
  readonly structuredReplies: boolean;
  /** Meta contexts were selected with SET_META_CONTEXT. */
  readonly metaContexts: boolean;
}

/** The flags each command accepts. FUA is accepted (and ignored where it means nothing) on all. */
export function allowedFlags(type: number, context: RequestContext): number {
  switch (type) {
    case NBD_CMD_READ:
      return NBD_CMD_FLAG_FUA | (context.structuredReplies ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
      // FAST_ZERO is advertised by writable exports only; elsewhere the spec asks for EINVAL.
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | (context.readOnly ? 0 : NBD_CMD_FLAG_FAST_ZERO);
    case NBD_CMD_BLOCK_STATUS:
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
    default:
      return NBD_CMD_FLAG_FUA;
  }
}

/**
 * The NBD error a request earns before reaching the device, or 0 when it is valid. Order follows
 * the spec's advice: unknown command and flags EINVAL, too large EINVAL (writes: the connection is
 * closed by the caller before this when the payload cannot be skipped), write to a read-only
 * export EPERM, out of bounds EINVAL (ENOSPC for writes).
 */
export function validateRequest(request: RequestHeader, context: RequestContext): number {
  const { type, flags, offset, length } = request;
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
      break;
    default:
      return NBD_EINVAL;
  }
  if ((flags & ~allowedFlags(type, context)) !== 0) return NBD_EINVAL;
  if (type === NBD_CMD_FLUSH) return offset === 0 && length === 0 ? 0 : NBD_EINVAL;
  if (type === NBD_CMD_BLOCK_STATUS && !context.metaContexts) return NBD_EINVAL;
  if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > NBD_MAX_PAYLOAD_SIZE) return NBD_EINVAL;
  const writing = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM;
  if (writing && context.readOnly) return NBD_EPERM;
  if (!Number.isSafeInteger(offset) || offset + length > context.size) {
    return type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
  }
  return 0;
}

/** A readable name for a command type, for messages. */
export function commandName(type: number): string {
  switch (type) {
    case NBD_CMD_READ:
      return 'NBD_CMD_READ';
    case NBD_CMD_WRITE:
      return 'NBD_CMD_WRITE';
    case NBD_CMD_DISC:
      return 'NBD_CMD_DISC';
    case NBD_CMD_FLUSH:
      return 'NBD_CMD_FLUSH';
    case NBD_CMD_TRIM:
      return 'NBD_CMD_TRIM';
    case NBD_CMD_CACHE:
      return 'NBD_CMD_CACHE';
    case NBD_CMD_WRITE_ZEROES:
      return 'NBD_CMD_WRITE_ZEROES';
    case NBD_CMD_BLOCK_STATUS:
      return 'NBD_CMD_BLOCK_STATUS';
    default:
      return `command ${type}`;
  }
}
