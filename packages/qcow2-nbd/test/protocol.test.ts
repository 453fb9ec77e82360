import { BlockDeviceError } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { protocol as P, toNbdError } from '../src/index.js';
import { metaContextPayload } from './test-client.js';

const context = { size: 1 << 20, readOnly: false, structuredReplies: true, metaContexts: true };

function header(type: number, offset: number, length: number, flags = 0) {
  return { magic: P.NBD_REQUEST_MAGIC, flags, type, cookie: 7n, offset, length };
}

describe('constants', () => {
  it('keep the values of the spec', () => {
    expect(P.NBD_MAGIC).toBe(0x4e42444d41474943n);
    expect(P.NBD_IHAVEOPT).toBe(0x49484156454f5054n);
    expect(P.NBD_REP_MAGIC).toBe(0x3e889045565a9n);
    expect([P.NBD_REQUEST_MAGIC, P.NBD_SIMPLE_REPLY_MAGIC, P.NBD_STRUCTURED_REPLY_MAGIC]).toEqual([
      0x25609513, 0x67446698, 0x668e33ef,
    ]);
    expect([P.NBD_REPLY_TYPE_OFFSET_HOLE, P.NBD_REPLY_TYPE_BLOCK_STATUS, P.NBD_REPLY_TYPE_ERROR]).toEqual([
      2, 5, 0x8001,
    ]);
    expect(P.NBD_REP_ERR_UNSUP).toBe(2 ** 31 + 1);
  });
});

describe('request codec', () => {
  it('round-trips a header and maps offsets past 2^53 to Infinity', () => {
    const bytes = P.encodeRequestHeader(header(P.NBD_CMD_WRITE, 2 ** 40 + 3, 4096, P.NBD_CMD_FLAG_FUA));
    expect(bytes.length).toBe(P.REQUEST_HEADER_SIZE);
    expect(P.decodeRequestHeader(bytes)).toEqual(
      header(P.NBD_CMD_WRITE, 2 ** 40 + 3, 4096, P.NBD_CMD_FLAG_FUA),
    );
    const huge = Buffer.from(bytes);
    huge.writeBigUInt64BE(2n ** 63n, 16);
    expect(P.decodeRequestHeader(huge).offset).toBe(Number.POSITIVE_INFINITY);
    // A header inside a larger pooled buffer decodes from its own offset.
    const pooled = Buffer.concat([Buffer.alloc(5), bytes]).subarray(5);
    expect(P.decodeRequestHeader(pooled).length).toBe(4096);
  });

  it('validates commands, flags and bounds as the spec asks', () => {
    const v = (h: ReturnType<typeof header>, c = context) => P.validateRequest(h, c);
    expect(v(header(P.NBD_CMD_READ, 0, 4096))).toBe(0);
    expect(v(header(P.NBD_CMD_READ, (1 << 20) - 1, 2))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_WRITE, (1 << 20) - 1, 2))).toBe(P.NBD_ENOSPC);
    expect(v(header(P.NBD_CMD_WRITE_ZEROES, 1 << 20, 1))).toBe(P.NBD_ENOSPC);
    expect(v(header(P.NBD_CMD_TRIM, 1 << 20, 1))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_READ, 0, 32 * 1024 * 1024 + 1))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_WRITE, 0, 1), { ...context, readOnly: true })).toBe(P.NBD_EPERM);
    expect(v(header(P.NBD_CMD_TRIM, 0, 1), { ...context, readOnly: true })).toBe(P.NBD_EPERM);
    expect(v(header(P.NBD_CMD_READ, 0, 1), { ...context, readOnly: true })).toBe(0);
    expect(v(header(42, 0, 0))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_READ, 0, 1, 1 << 9))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_WRITE, 0, 1, P.NBD_CMD_FLAG_DF))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_READ, 0, 1, P.NBD_CMD_FLAG_DF))).toBe(0);
    expect(v(header(P.NBD_CMD_READ, 0, 1, P.NBD_CMD_FLAG_DF), { ...context, structuredReplies: false })).toBe(
      P.NBD_EINVAL,
    );
    expect(v(header(P.NBD_CMD_WRITE_ZEROES, 0, 1, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO))).toBe(
      0,
    );
    // FAST_ZERO is not advertised by read-only exports: EINVAL before EPERM.
    expect(
      v(header(P.NBD_CMD_WRITE_ZEROES, 0, 1, P.NBD_CMD_FLAG_FAST_ZERO), { ...context, readOnly: true }),
    ).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_BLOCK_STATUS, 0, 1, P.NBD_CMD_FLAG_REQ_ONE))).toBe(0);
    expect(v(header(P.NBD_CMD_BLOCK_STATUS, 0, 1), { ...context, metaContexts: false })).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_FLUSH, 0, 0))).toBe(0);
    expect(v(header(P.NBD_CMD_FLUSH, 0, 1))).toBe(P.NBD_EINVAL);
    expect(v(header(P.NBD_CMD_READ, Number.POSITIVE_INFINITY, 1))).toBe(P.NBD_EINVAL);
  });
});

describe('option codecs', () => {
  it('decode INFO/GO and meta context payloads, rejecting malformed ones', () => {
    const meta = metaContextPayload('disk', ['base:allocation', 'qemu:']);
    expect(P.decodeMetaContextRequest(meta)).toEqual({
      exportName: 'disk',
      queries: ['base:allocation', 'qemu:'],
    });
    expect(() => P.decodeMetaContextRequest(meta.subarray(0, meta.length - 1))).toThrow(P.OptionDecodeError);
    expect(() => P.decodeMetaContextRequest(Buffer.concat([meta, Buffer.from([0])]))).toThrow(/trailing/);
    const info = Buffer.from([0, 0, 0, 2, 0x61, 0x62, 0, 1, 0, 3]);
    expect(P.decodeInfoRequest(info)).toEqual({ name: 'ab', infoTypes: [3] });
    expect(() => P.decodeInfoRequest(Buffer.from([0, 0, 0x10, 0x01]))).toThrow(/longer than 4096/);
    expect(() => P.decodeInfoRequest(Buffer.from([0, 0, 0, 1, 0, 0, 0]))).toThrow(/NUL/);
    expect(() => P.decodeInfoRequest(Buffer.from([0, 0, 0, 1, 0xff, 0, 0]))).toThrow(/UTF-8/);
  });

  it('encode replies with the right magic, lengths and fields', () => {
    const reply = P.encodeInfoExport(P.NBD_OPT_GO, 1 << 30, 0x1ff);
    expect(reply.readBigUInt64BE(0)).toBe(P.NBD_REP_MAGIC);
    expect([reply.readUInt32BE(8), reply.readUInt32BE(12), reply.readUInt32BE(16)]).toEqual([
      7,
      P.NBD_REP_INFO,
      12,
    ]);
    expect(Number(reply.readBigUInt64BE(22))).toBe(1 << 30);
    expect(P.encodeExportNameReply(512, 3, false).length).toBe(134);
    expect(P.encodeExportNameReply(512, 3, true).length).toBe(10);
    const error = P.encodeErrorChunk(9n, P.NBD_EIO, 'x'.repeat(5000));
    expect(error.readUInt16BE(6)).toBe(P.NBD_REPLY_TYPE_ERROR);
    expect(error.readUInt16BE(24)).toBe(4096);
    const status = P.encodeBlockStatusChunk(9n, true, 1, [{ length: 4096, status: 3 }]);
    expect([status.readUInt16BE(4), status.readUInt32BE(16), status.readUInt32BE(28)]).toEqual([1, 12, 3]);
  });
});

describe('error mapping', () => {
  it('maps device error codes to NBD errors in one place', () => {
    const map = (code: ConstructorParameters<typeof BlockDeviceError>[0]) =>
      toNbdError(new BlockDeviceError(code, 'x'));
    expect(map('EINVAL')).toBe(P.NBD_EINVAL);
    expect(map('EROFS')).toBe(P.NBD_EPERM);
    expect(map('ENOSPC')).toBe(P.NBD_ENOSPC);
    // ENOTSUP only answers a FAST_ZERO request (the spec allows it nowhere else).
    expect(map('ENOTSUP')).toBe(P.NBD_EINVAL);
    expect(map('EUNSUPPORTED')).toBe(P.NBD_EINVAL);
    expect(toNbdError(new BlockDeviceError('ENOTSUP', 'x'), { fastZero: true })).toBe(P.NBD_ENOTSUP);
    expect(map('ECLOSED')).toBe(P.NBD_ESHUTDOWN);
    expect(map('ECORRUPT')).toBe(P.NBD_EIO);
    expect(toNbdError(new Error('boom'))).toBe(P.NBD_EIO);
  });
});
