/**
 * `qemu-img amend -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N` on a qcow2 file;
 * data kept.
 *
 * - refcount_bits: the refcount structures are rebuilt at the new width (written and flushed in
 *   free clusters), then one header write switches table and width together; the old ones are
 *   freed after.
 * - compat=1.1 (upgrade): the header is rewritten as version 3 with a feature name table.
 * - compat=0.10 (downgrade): refused for what version 2 cannot express (extended L2, external data
 *   file, zstd compression, bitmaps, refcounts other than 16 bits), as QEMU refuses; zero clusters
 *   become what reads the same in version 2: unallocated (no backing file) or allocated clusters of
 *   zeros; then the header is rewritten as version 2 (lazy refcounts dropped).
 * - data_file=NAME (images that have an external data file; empty drops the name) and
 *   data_file_raw=off (on only where it is on already), as QEMU allows them.
 */

import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { entryOffset, QCOW_OFLAG_COPIED_HIGH } from '../check/entries.js';
import { encodeText } from '../format/binary.js';
import {
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW2_AUTOCLEAR_DATA_FILE_RAW,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_EXTL2,
} from '../format/feature-bits.js';
import { encodeFeatureNameTable } from '../format/feature-name-table.js';
import { QCOW2_V3_HEADER_LENGTH } from '../format/header.js';
import {
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
} from '../format/header-extensions.js';
import { classifyL2Entry } from '../format/l2-entry.js';
import { maxRefcount } from '../format/refcount.js';
import { readSnapshotTable } from '../snapshot/snapshot-list.js';
import { rewriteHeader } from './header-rewrite.js';
import { ImageEdit, type ImageEditOptions } from './image-edit.js';

export interface AmendOptions extends ImageEditOptions {
  readonly compat?: '0.10' | '1.1';
  readonly lazyRefcounts?: boolean;
  /** Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64. */
  readonly refcountBits?: number;
  /** The external data file's name (only for images that have one; '' removes the name). */
  readonly dataFile?: string;
  /** data_file_raw: can be turned off; on only where it is already. */
  readonly dataFileRaw?: boolean;
}

/** Changes the image's options as `qemu-img amend` does. */
export async function amendImage(file: BlockDevice, options: AmendOptions): Promise<void> {
  const edit = await ImageEdit.open(file, options);
  const version = options.compat === undefined ? edit.header.version : options.compat === '1.1' ? 3 : 2;
  const refcountOrder =
    options.refcountBits === undefined ? edit.header.refcountOrder : orderOf(options.refcountBits);
  if (options.lazyRefcounts === true && version === 2) {
    throw new BlockDeviceError('EINVAL', 'qcow2 amend: lazy refcounts need compat=1.1');
  }
  if (version === 2 && refcountOrder !== 4) {
    throw new BlockDeviceError('EINVAL', 'qcow2 amend: compat=0.10 needs refcount_bits=16');
  }
  const hasDataFile = (edit.header.incompatibleFeatures.low & QCOW2_INCOMPAT_DATA_FILE) !== 0;
  const dataFileRaw =
    hasDataFile && (edit.header.autoclearFeatures.low & QCOW2_AUTOCLEAR_DATA_FILE_RAW) !== 0;
  // QEMU's checks and words.
  if (options.dataFile !== undefined && !hasDataFile) {
    throw new BlockDeviceError(
      'EINVAL',
      'qcow2 amend: data-file can only be set for images that use an external data file',
    );
  }
  if (options.dataFileRaw === true && !dataFileRaw) {
    throw new BlockDeviceError('EINVAL', 'qcow2 amend: data-file-raw cannot be set on existing images');
  }
  if (version === 3 && edit.header.version === 2) await rewriteHeader(edit, upgradedFields(edit));
  if (refcountOrder !== edit.header.refcountOrder) await changeRefcountWidth(edit, refcountOrder);
  if (version === 2 && edit.header.version === 3) await downgrade(edit);
  if (options.lazyRefcounts !== undefined && edit.header.version === 3) {
    const low = edit.header.compatibleFeatures.low;
    const wanted = options.lazyRefcounts
      ? low | QCOW2_COMPAT_LAZY_REFCOUNTS
      : low & ~QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (wanted !== low) {
      await rewriteHeader(edit, {
        compatibleFeatures: { high: edit.header.compatibleFeatures.high, low: wanted },
      });
    }
  }
  if (options.dataFile !== undefined || (options.dataFileRaw === false && dataFileRaw)) {
    await rewriteHeader(edit, dataFileFields(edit, options));
  }
}

/** The header fields for a changed data file name and/or a cleared data_file_raw bit. */
function dataFileFields(edit: ImageEdit, options: AmendOptions) {
  const { autoclearFeatures, extensions } = edit.header;
  let list = extensions.list;
  if (options.dataFile !== undefined) {
    const named = { type: QCOW2_EXT_MAGIC_DATA_FILE, data: encodeText(options.dataFile) };
    const at = list.findIndex((extension) => extension.type === QCOW2_EXT_MAGIC_DATA_FILE);
    const kept = list.filter((extension) => extension.type !== QCOW2_EXT_MAGIC_DATA_FILE);
    // In place, or after the backing format, where QEMU writes it.
    const position =
      at >= 0 ? at : kept.findIndex((extension) => extension.type === QCOW2_EXT_MAGIC_BACKING_FORMAT) + 1;
    list = options.dataFile === '' ? kept : [...kept.slice(0, position), named, ...kept.slice(position)];
  }
  if (options.dataFileRaw !== false) return { extensions: list };
  // Cleared with the bits this engine does not know (rewriteHeader's rule).
  const low = autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS;
  return { extensions: list, autoclearFeatures: { high: 0, low } };
}

function orderOf(bits: number): number {
  const order = Math.log2(bits);
  if (!Number.isInteger(order) || order < 0 || order > 6) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 amend: refcount_bits ${bits} is not a power of two from 1 to 64`,
    );
  }
  return order;
}

function upgradedFields(edit: ImageEdit) {
  const hasTable = edit.header.extensions.list.some((e) => e.type === QCOW2_EXT_MAGIC_FEATURE_TABLE);
  return {
    version: 3 as const,
    headerLength: QCOW2_V3_HEADER_LENGTH,
    compressionType: 0,
    refcountOrder: 4,
    incompatibleFeatures: { high: 0, low: 0 },
    compatibleFeatures: { high: 0, low: 0 },
    autoclearFeatures: { high: 0, low: 0 },
    extensions: hasTable
      ? edit.header.extensions.list
      : [...edit.header.extensions.list, encodeFeatureNameTable()],
  };
}

/** New refcount structures at `refcountOrder`, switched to with the header in one write. */
async function changeRefcountWidth(edit: ImageEdit, refcountOrder: number): Promise<void> {
  if (edit.header.version === 2) {
    throw new BlockDeviceError('EINVAL', 'qcow2 amend: refcount_bits other than 16 need compat=1.1');
  }
  const max = maxRefcount(refcountOrder);
  edit.counts.forEach((count, clusterIndex) => {
    if (count > max) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow2 amend: refcount ${count} does not fit in ${2 ** refcountOrder} bits`,
        { offset: clusterIndex * edit.clusterSize },
      );
    }
  });
  const { clusterSize } = edit;
  await edit.rebuildRefcounts(refcountOrder, (layout) =>
    rewriteHeader(edit, {
      refcountOrder,
      refcountTableOffset: layout.tableClusterIndex * clusterSize,
      refcountTableClusters: layout.tableClusters,
    }),
  );
}

/** compat=0.10: refuse what v2 cannot hold, turn zero clusters into v2 equivalents, rewrite the header. */
async function downgrade(edit: ImageEdit): Promise<void> {
  const { header } = edit;
  const incompatible = header.incompatibleFeatures.low;
  const refuse = (why: string) => {
    throw new BlockDeviceError('EUNSUPPORTED', `qcow2 amend: cannot downgrade to compat=0.10: ${why}`);
  };
  if ((incompatible & QCOW2_INCOMPAT_EXTL2) !== 0) refuse('the image uses extended L2 entries');
  if ((incompatible & QCOW2_INCOMPAT_DATA_FILE) !== 0) refuse('the image has an external data file');
  if ((incompatible & QCOW2_INCOMPAT_COMPRESSION) !== 0 && header.compressionType !== 0) {
    refuse('the image uses zstd compression');
  }
  if (
    (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) !== 0 ||
    header.extensions.bitmaps !== undefined
  ) {
    refuse('the image has persistent bitmaps');
  }
  const l1Tables = [{ offset: header.l1TableOffset, size: header.l1Size, active: true }];
  for (const snapshot of await readSnapshotTable(edit.file, header)) {
    l1Tables.push({ offset: snapshot.l1TableOffset, size: snapshot.l1Size, active: false });
  }
  await expandZeroClusters(edit, l1Tables, header.backingFileName !== undefined);
  await rewriteHeader(edit, {
    version: 2,
    incompatibleFeatures: { high: 0, low: 0 },
    compatibleFeatures: { high: 0, low: 0 },
    autoclearFeatures: { high: 0, low: 0 },
    extensions: header.extensions.list.filter((e) => e.type !== QCOW2_EXT_MAGIC_FEATURE_TABLE),
  });
}

/**
 * Zero clusters in every L1 table: a plain one becomes unallocated without a backing file and an
 * allocated cluster of zeros with one; an allocated one gets zeros written into its cluster and
 * loses the flag (refused when that cluster is shared, since another table may read it as data).
 */
async function expandZeroClusters(
  edit: ImageEdit,
  l1Tables: readonly { offset: number; size: number; active: boolean }[],
  hasBacking: boolean,
): Promise<void> {
  const { clusterSize, file } = edit;
  const zeros = new Uint8Array(clusterSize);
  const seen = new Set<number>();
  for (const { offset, size } of l1Tables) {
    if (size === 0) continue;
    const l1 = await file.read(offset, size * 8);
    const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < size; i++) {
      const l2Offset = entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4));
      if (l2Offset === 0 || seen.has(l2Offset)) continue;
      seen.add(l2Offset);
      const table = await file.read(l2Offset, clusterSize);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      let dirty = false;
      for (let at = 0; at < clusterSize; at += 8) {
        const high = view.getUint32(at);
        const low = view.getUint32(at + 4);
        const type = classifyL2Entry(high, low, false, false);
        if (type === 'zero-plain') {
          if (hasBacking) {
            // Referenced once per L1 table that reaches this L2 table (shared with snapshots).
            const l2References = edit.counts[l2Offset / clusterSize] ?? 1;
            const hostOffset = edit.allocate(1);
            if (l2References > 1) edit.addReferences(hostOffset, clusterSize, l2References - 1);
            await edit.write(hostOffset, zeros);
            const copied = l2References === 1 ? QCOW_OFLAG_COPIED_HIGH : 0;
            view.setUint32(at, (Math.floor(hostOffset / 0x1_0000_0000) | copied) >>> 0);
            view.setUint32(at + 4, hostOffset >>> 0);
          } else {
            view.setUint32(at, 0);
            view.setUint32(at + 4, 0);
          }
          dirty = true;
        } else if (type === 'zero-alloc') {
          const hostOffset = entryOffset(high, low);
          if ((edit.counts[hostOffset / clusterSize] ?? 0) !== 1) {
            throw new BlockDeviceError(
              'EUNSUPPORTED',
              'qcow2 amend: cannot downgrade: a preallocated zero cluster is shared with a snapshot',
              { offset: hostOffset },
            );
          }
          await file.write(hostOffset, zeros);
          view.setUint32(at + 4, (low & ~1) >>> 0);
          dirty = true;
        }
      }
      if (dirty) {
        // Zeros and refcounts of new clusters are durable before the table points at them.
        await edit.flush();
        await edit.commitRefcounts();
        await file.write(l2Offset, table);
        await edit.flush();
      }
    }
  }
  await edit.fixCopiedFlags();
}
