/**
 * The fixed newstyle handshake: greeting, client flags, then the option haggling until the client
 * picks an export (EXPORT_NAME or GO), aborts, or breaks the protocol.
 */
import type { SecureContext } from 'node:tls';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_MAX_OPTION_SIZE,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  OPTION_HEADER_SIZE,
} from '../protocol/constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeMetaContextReply,
  encodeOptionError,
  encodeOptionReply,
  encodeServerReply,
  OptionDecodeError,
} from '../protocol/options.js';
import type { ConnectionIo } from './connection-io.js';
import {
  blockSizes,
  findExport,
  type MetaContext,
  matchContexts,
  type NbdExport,
  transmissionFlags,
} from './export.js';

export interface HandshakeConfig {
  readonly exports: readonly NbdExport[];
  readonly secureContext: SecureContext | undefined;
  /** With TLS configured, refuse everything but STARTTLS and ABORT before TLS (default true). */
  readonly tlsRequired: boolean;
  readonly multiConn: boolean;
}

/** What the handshake agreed on; the transmission phase runs with it. */
export interface Session {
  readonly export: NbdExport;
  readonly structuredReplies: boolean;
  readonly metaContexts: readonly MetaContext[];
  readonly transmissionFlags: number;
}

/**
 * Option replies queued for the socket past which the next option is not read until they have
 * been written: a client that sends options without reading the replies is held at this, plus the
 * socket's own buffers, rather than at the handshake timeout (qemu-nbd writes each reply before
 * it reads on).
 */
export const HANDSHAKE_PENDING_MAX = 64 * 1024;

/** A protocol violation that ends the connection without a reply. */
export class HandshakeAbort extends Error {
  override name = 'HandshakeAbort';
}

/** Runs the handshake. Resolves with a session, or undefined when the client aborted. */
export async function negotiate(io: ConnectionIo, config: HandshakeConfig): Promise<Session | undefined> {
  io.send(encodeGreeting());
  const clientFlags = (await io.reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
    throw new HandshakeAbort(`handshake: unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;
  let structuredReplies = false;
  let selected: { exportName: string; contexts: MetaContext[] } | undefined;

  const sessionFor = (entry: NbdExport): Session => ({
    export: entry,
    structuredReplies,
    metaContexts:
      selected !== undefined && findExport(config.exports, selected.exportName) === entry
        ? selected.contexts
        : [],
    transmissionFlags: transmissionFlags(entry, { structuredReplies, multiConn: config.multiConn }),
  });

  for (;;) {
    if (io.pendingBytes > HANDSHAKE_PENDING_MAX) await io.drained();
    const header = decodeOptionHeader(await io.reader.read(OPTION_HEADER_SIZE));
    if (header.magic !== NBD_IHAVEOPT) throw new HandshakeAbort('handshake: bad option magic');
    const { option, length } = header;
    if (length > NBD_MAX_OPTION_SIZE) {
      throw new HandshakeAbort(`handshake: option ${option} payload of ${length} bytes is too large`);
    }
    const payload = await io.reader.read(length);
    const reply = (type: number, data?: Uint8Array) => io.send(encodeOptionReply(option, type, data));
    const fail = (type: number, message: string) => io.send(encodeOptionError(option, type, message));

    if (config.secureContext !== undefined && config.tlsRequired && !io.tls) {
      if (option === NBD_OPT_EXPORT_NAME) throw new HandshakeAbort('handshake: EXPORT_NAME before STARTTLS');
      if (option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
        fail(NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
        continue;
      }
    }

    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: {
          if (length > NBD_MAX_STRING_SIZE) throw new HandshakeAbort('handshake: export name too long');
          const entry = findExport(config.exports, payload.toString('utf8'));
          // EXPORT_NAME cannot report an error: an unknown name ends the connection.
          if (entry === undefined) throw new HandshakeAbort('handshake: unknown export requested');
          const session = sessionFor(entry);
          io.send(encodeExportNameReply(entry.device.size, session.transmissionFlags, noZeroes));
          return session;
        }
        case NBD_OPT_ABORT:
          reply(NBD_REP_ACK);
          return undefined;
        case NBD_OPT_LIST:
          if (length !== 0) {
            fail(NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const entry of config.exports) {
            io.send(encodeServerReply(option, entry.name, entry.description ?? ''));
          }
          reply(NBD_REP_ACK);
          break;
        case NBD_OPT_STARTTLS:
          if (config.secureContext === undefined) {
            fail(NBD_REP_ERR_UNSUP, 'TLS is not configured on this server');
          } else if (io.tls) {
            fail(NBD_REP_ERR_INVALID, 'TLS is already active');
          } else if (length !== 0) {
            fail(NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          } else {
            reply(NBD_REP_ACK);
            await io.startTls(config.secureContext);
            // Anything agreed before TLS is forgotten.
            structuredReplies = false;
            selected = undefined;
          }
          break;
        case NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) {
            fail(NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          } else {
            structuredReplies = true;
            reply(NBD_REP_ACK);
          }
          break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const request = decodeInfoRequest(payload);
          const entry = findExport(config.exports, request.name);
          if (entry === undefined) {
            fail(NBD_REP_ERR_UNKNOWN, `export '${request.name}' does not exist`);
            break;
          }
          const session = sessionFor(entry);
          io.send(encodeInfoExport(option, entry.device.size, session.transmissionFlags));
          if (request.infoTypes.includes(NBD_INFO_NAME)) io.send(encodeInfoName(option, entry.name));
          if (request.infoTypes.includes(NBD_INFO_DESCRIPTION) && entry.description !== undefined) {
            io.send(encodeInfoDescription(option, entry.description));
          }
          const sizes = blockSizes(entry);
          io.send(encodeInfoBlockSize(option, sizes.minimum, sizes.preferred, sizes.maximum));
          reply(NBD_REP_ACK);
          if (option === NBD_OPT_GO) return session;
          break;
        }
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: {
          if (!structuredReplies) {
            fail(NBD_REP_ERR_INVALID, 'meta contexts need NBD_OPT_STRUCTURED_REPLY first');
            break;
          }
          const request = decodeMetaContextRequest(payload);
          const entry = findExport(config.exports, request.exportName);
          if (entry === undefined) {
            fail(NBD_REP_ERR_UNKNOWN, `export '${request.exportName}' does not exist`);
            break;
          }
          const listing = option === NBD_OPT_LIST_META_CONTEXT;
          const contexts = matchContexts(entry, request.queries, listing);
          for (const context of contexts) io.send(encodeMetaContextReply(option, context.id, context.name));
          if (!listing) selected = { exportName: request.exportName, contexts };
          reply(NBD_REP_ACK);
          break;
        }
        default:
          fail(NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (error) {
      if (error instanceof OptionDecodeError) {
        fail(NBD_REP_ERR_INVALID, error.message);
        continue;
      }
      throw error;
    }
  }
}
