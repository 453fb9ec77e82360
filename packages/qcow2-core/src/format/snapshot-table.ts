/**
 * The internal snapshot table: nb_snapshots variable-length entries at snapshots_offset, each
 * padded to 8 bytes. Entry layout: l1_table_offset 0, l1_size 8, id_str_size 12, name_size 14,
 * date_sec 16, date_nsec 20, vm_clock_nsec 24, vm_state_size 32, extra_data_size 36, extra data
 * (vm_state_size_large 0, disk_size 8, icount 16), then the id string and the name.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeText, hex, readU64, viewOf } from './binary.js';
import { isAligned, QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS } from './geometry.js';

/** Most bytes QEMU reads for a snapshot table (QCOW_MAX_SNAPSHOTS_SIZE). */
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
const FIXED_ENTRY_SIZE = 40;

export interface Qcow2SnapshotEntry {
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly id: string;
  readonly name: string;
  readonly dateSec: number;
  readonly dateNsec: number;
  readonly vmClockNsec: number;
  /** vm_state_size_large when the extra data has it, else vm_state_size. */
  readonly vmStateSize: number;
  /** Guest size when the snapshot was taken; undefined when the extra data lacks it. */
  readonly diskSize: number | undefined;
  /** Instruction count; undefined when absent or -1. */
  readonly icount: number | undefined;
  readonly extraData: Uint8Array;
  /** Offset of the entry inside the table. */
  readonly entryOffset: number;
}

export type SnapshotTableDecode =
  | { readonly kind: 'done'; readonly entries: Qcow2SnapshotEntry[]; readonly tableSize: number }
  /** `bytes` is too short: call again with at least `needBytes` bytes of the table. */
  | { readonly kind: 'need-more'; readonly needBytes: number };

/**
 * Decodes `count` entries from the start of `bytes` (the table, read from `tableOffset`, used for
 * error offsets). When `bytes` ends early it asks for more rather than failing, so callers can read
 * the table in growing chunks without trusting a size from the file.
 */
export function decodeSnapshotTable(
  bytes: Uint8Array,
  count: number,
  clusterSize: number,
  tableOffset = 0,
): SnapshotTableDecode {
  if (count > QCOW_MAX_SNAPSHOTS) {
    throw new BlockDeviceError('ECORRUPT', `snapshot table: ${count} snapshots exceed ${QCOW_MAX_SNAPSHOTS}`);
  }
  const view = viewOf(bytes);
  const entries: Qcow2SnapshotEntry[] = [];
  let at = 0;
  for (let index = 0; index < count; index++) {
    if (at + FIXED_ENTRY_SIZE > bytes.length) return needMore(at + FIXED_ENTRY_SIZE);
    const where = tableOffset + at;
    const l1TableOffset = readU64(view, at, `snapshot ${index}: l1_table_offset`, where);
    const l1Size = view.getUint32(at + 8);
    const idSize = view.getUint16(at + 12);
    const nameSize = view.getUint16(at + 14);
    const extraDataSize = view.getUint32(at + 36);
    if (extraDataSize > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `snapshot ${index}: extra data of ${extraDataSize} bytes is too large`,
        {
          offset: where + 36,
        },
      );
    }
    if (l1Size > QCOW_MAX_L1_SIZE / 8) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `snapshot ${index}: L1 table of ${l1Size} entries is too large`,
        {
          offset: where + 8,
        },
      );
    }
    if (l1Size > 0 && !isAligned(l1TableOffset, clusterSize)) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `snapshot ${index}: l1_table_offset ${hex(l1TableOffset)} is not cluster-aligned`,
        { offset: where },
      );
    }
    const entryEnd = at + FIXED_ENTRY_SIZE + extraDataSize + idSize + nameSize;
    const paddedEnd = Math.ceil(entryEnd / 8) * 8;
    if (paddedEnd > QCOW_MAX_SNAPSHOTS_SIZE) {
      throw new BlockDeviceError('ECORRUPT', 'snapshot table: the table is too large', { offset: where });
    }
    if (entryEnd > bytes.length) return needMore(entryEnd);
    const extraStart = at + FIXED_ENTRY_SIZE;
    const extraData = bytes.slice(extraStart, extraStart + extraDataSize);
    let vmStateSize = view.getUint32(at + 32);
    let diskSize: number | undefined;
    let icount: number | undefined;
    if (extraDataSize >= 8)
      vmStateSize = readU64(view, extraStart, `snapshot ${index}: vm_state_size`, where + 40);
    if (extraDataSize >= 16)
      diskSize = readU64(view, extraStart + 8, `snapshot ${index}: disk_size`, where + 48);
    if (extraDataSize >= 24) {
      const high = view.getUint32(extraStart + 16);
      const low = view.getUint32(extraStart + 20);
      icount =
        high === 0xffffffff && low === 0xffffffff ? undefined : readU64(view, extraStart + 16, 'icount');
    }
    const idStart = extraStart + extraDataSize;
    entries.push({
      l1TableOffset,
      l1Size,
      id: decodeText(bytes.subarray(idStart, idStart + idSize)),
      name: decodeText(bytes.subarray(idStart + idSize, idStart + idSize + nameSize)),
      dateSec: view.getUint32(at + 16),
      dateNsec: view.getUint32(at + 20),
      vmClockNsec: readU64(view, at + 24, `snapshot ${index}: vm_clock_nsec`, where + 24),
      vmStateSize,
      diskSize,
      icount,
      extraData,
      entryOffset: at,
    });
    at = paddedEnd;
  }
  return { kind: 'done', entries, tableSize: at };
}

function needMore(needBytes: number): SnapshotTableDecode {
  return { kind: 'need-more', needBytes };
}
