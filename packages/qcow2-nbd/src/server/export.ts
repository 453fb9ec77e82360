/**
 * An export: a named BlockDevice, and what the server tells clients about it (transmission flags,
 * block sizes, meta contexts), derived from the device's capabilities and the export's options.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import {
  BASE_ALLOCATION,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_PAYLOAD_SIZE,
  QEMU_ALLOCATION_DEPTH,
  QEMU_DIRTY_BITMAP_PREFIX,
} from '../protocol/constants.js';

export interface NbdExport {
  /** The export name clients ask for. The empty name also selects the first export. */
  readonly name: string;
  readonly description?: string;
  readonly device: BlockDevice;
  /** Serve read-only even when the device is writable. Default: the device's own readOnly. */
  readonly readOnly?: boolean;
  /** `true` (default): NBD_CMD_TRIM discards on the device. `false`: trims succeed and do nothing
   * (qemu-nbd's `--discard=ignore`). */
  readonly discard?: boolean;
  /** Offer the `qemu:allocation-depth` meta context (qemu-nbd's `-A`). Default false. */
  readonly allocationDepth?: boolean;
  /**
   * Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts (qemu-nbd's `-B NAME`), listed
   * in this order. Any source of dirty ranges works: a qcow2 image's persistent bitmap, or your own.
   */
  readonly dirtyBitmaps?: readonly NbdDirtyBitmap[];
  /**
   * The open file whose bytes are the export's, from its offset 0 (a raw file served as it is),
   * on a memory-backed file system (tmpfs): READ replies of at least FILE_SEND_MINIMUM bytes are then
   * sent from it with sendfile(2) on plain connections, never through a buffer of ours. Leave it
   * out for files on disks (sendfile there would wait for the disk on the event loop's thread) and
   * whenever the device is not exactly the file (an overlay, a format, an offset).
   *
   * `writes: true` (the file open for writing, the export writable): WRITE payloads longer than
   * 64 KiB go straight into the file too, moved from the socket by splice(2) on plain connections
   * (written from the reader's buffers otherwise), never through `device.write`. Only when the
   * device has nothing to learn from its writes (no cache of the file's bytes, no dirty tracking).
   */
  readonly fileSource?: { readonly fd: number; readonly writes?: boolean };
}

/** One run of a dirty bitmap: `length` bytes, all dirty or all clean. */
export interface DirtyExtent {
  readonly length: number;
  readonly dirty: boolean;
}

/** A source of dirty ranges, served as the meta context `qemu:dirty-bitmap:${name}`. */
export interface NbdDirtyBitmap {
  readonly name: string;
  /**
   * The runs covering `[offset, offset + length)` in order, starting at `offset`, at most `limit` of
   * them (at least one). They may end before the range does (the client asks again); they must not
   * reach past it. `offset + length` never passes the export's size.
   */
  extents(offset: number, length: number, limit: number): Promise<readonly DirtyExtent[]>;
}

/** Meta context ids: fixed per server, so they stay valid across connections. */
export const CONTEXT_ID_BASE_ALLOCATION = 1;
export const CONTEXT_ID_ALLOCATION_DEPTH = 2;
/** The id of the export's dirty bitmap number `index` (in `dirtyBitmaps`). */
export const CONTEXT_ID_DIRTY_BITMAP_FIRST = 3;

export interface MetaContext {
  readonly id: number;
  readonly name: string;
}

export function isExportReadOnly(entry: NbdExport): boolean {
  return entry.readOnly === true || entry.device.readOnly;
}

/** Transmission flags, true to the device: nothing is advertised that the export cannot do. */
export function transmissionFlags(
  entry: NbdExport,
  options: { structuredReplies: boolean; multiConn: boolean },
): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
  if (isExportReadOnly(entry)) {
    flags |= NBD_FLAG_READ_ONLY;
  } else {
    // SEND_FAST_ZERO promises quick feedback, not fast zeroing: a device that cannot zero fast gets
    // an immediate ENOTSUP for FAST_ZERO requests (as qemu-nbd and nbdkit advertise it).
    flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  }
  if (options.structuredReplies) flags |= NBD_FLAG_SEND_DF;
  if (options.multiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  return flags;
}

/** Block sizes for NBD_INFO_BLOCK_SIZE: any alignment works (devices handle partial blocks). */
export function blockSizes(entry: NbdExport): { minimum: number; preferred: number; maximum: number } {
  const capabilities = entry.device.capabilities;
  const preferred = Math.min(Math.max(4096, capabilities.preferredAlignment), NBD_MAX_PAYLOAD_SIZE);
  return { minimum: 1, preferred, maximum: NBD_MAX_PAYLOAD_SIZE };
}

/** The meta contexts an export offers. */
export function availableContexts(entry: NbdExport): MetaContext[] {
  const contexts: MetaContext[] = [{ id: CONTEXT_ID_BASE_ALLOCATION, name: BASE_ALLOCATION }];
  if (entry.allocationDepth === true) {
    contexts.push({ id: CONTEXT_ID_ALLOCATION_DEPTH, name: QEMU_ALLOCATION_DEPTH });
  }
  entry.dirtyBitmaps?.forEach((bitmap, index) => {
    contexts.push({
      id: CONTEXT_ID_DIRTY_BITMAP_FIRST + index,
      name: QEMU_DIRTY_BITMAP_PREFIX + bitmap.name,
    });
  });
  return contexts;
}

/**
 * Contexts matching the client's queries. No query: all of them for LIST, none for SET. A query
 * naming only a namespace (`base:`) matches every context in it, for LIST only.
 */
export function matchContexts(entry: NbdExport, queries: readonly string[], listing: boolean): MetaContext[] {
  const available = availableContexts(entry);
  if (queries.length === 0) return listing ? available : [];
  const matched = new Map<number, MetaContext>();
  for (const query of queries) {
    for (const context of available) {
      const namespaceQuery = listing && query.endsWith(':') && context.name.startsWith(query);
      if (context.name === query || namespaceQuery) matched.set(context.id, context);
    }
  }
  return [...matched.values()];
}

/** The dirty bitmap a context id stands for, if it stands for one. */
export function dirtyBitmapOf(entry: NbdExport, contextId: number): NbdDirtyBitmap | undefined {
  return entry.dirtyBitmaps?.[contextId - CONTEXT_ID_DIRTY_BITMAP_FIRST];
}

export function findExport(exports: readonly NbdExport[], name: string): NbdExport | undefined {
  return exports.find((entry) => entry.name === name) ?? (name === '' ? exports[0] : undefined);
}
