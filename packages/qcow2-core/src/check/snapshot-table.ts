/**
 * The snapshot table as the check needs it: each snapshot's id, name and L1 table, and the bytes
 * the table spans (QEMU counts from the table offset to the end of the last entry, without the
 * final padding). Entries are 8-byte aligned: a 40-byte fixed part (l1_table_offset 0, l1_size 8,
 * id_str_size 12, name_size 14, ..., extra_data_size 36), the extra data, the id, the name.
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { readZeroPadded } from './read-padded.js';

/** QEMU's caps: extra data per entry, and the whole table. */
const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
const QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024;
const SNAPSHOT_HEADER_SIZE = 40;
/** Bytes read at a time while walking the table. */
const CHUNK = 64 * 1024;

export interface CheckSnapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  /** The exact L1 table offset in hex, without a prefix. */
  l1TableOffsetHex: string;
  /** The offset modulo 2^32 (exact), for alignment tests. */
  l1TableOffsetLow: number;
  l1Size: number;
  extraDataSize: number;
}

export interface CheckSnapshotTable {
  snapshots: CheckSnapshot[];
  /** Bytes from the table offset to the end of the last entry. */
  size: number;
}

const decoder = new TextDecoder('utf-8', { fatal: false });

/** The text up to the first NUL, as C prints it. */
function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return decoder.decode(end < 0 ? bytes : bytes.subarray(0, end));
}

export async function readSnapshotTableForCheck(
  file: BlockDevice,
  snapshotsOffset: number,
  nbSnapshots: number,
  request?: RequestOptions,
): Promise<CheckSnapshotTable> {
  const snapshots: CheckSnapshot[] = [];
  let windowStart = -1;
  let window: Uint8Array = new Uint8Array(0);
  // Reads `length` bytes at table-relative `at`, through a window of CHUNK bytes.
  const bytesAt = async (at: number, length: number): Promise<Uint8Array> => {
    if (at + length > QCOW_MAX_SNAPSHOTS_SIZE) {
      throw new BlockDeviceError('ECORRUPT', 'qcow2 snapshot table: the table is too big', {
        offset: snapshotsOffset,
      });
    }
    if (windowStart < 0 || at < windowStart || at + length > windowStart + window.length) {
      windowStart = at;
      window = await readZeroPadded(file, snapshotsOffset + at, Math.max(CHUNK, length), request);
    }
    return window.subarray(at - windowStart, at - windowStart + length);
  };
  let at = 0;
  for (let index = 0; index < nbSnapshots; index++) {
    at = Math.ceil(at / 8) * 8;
    const fixed = await bytesAt(at, SNAPSHOT_HEADER_SIZE);
    const view = new DataView(fixed.buffer, fixed.byteOffset, fixed.byteLength);
    const l1High = view.getUint32(0);
    const l1Low = view.getUint32(4);
    // Inexact above 2^53 (then far past the end of any file); messages use the exact hex.
    const l1TableOffset = l1High * 0x1_0000_0000 + l1Low;
    const l1TableOffsetHex =
      l1High === 0 ? l1Low.toString(16) : l1High.toString(16) + l1Low.toString(16).padStart(8, '0');
    const l1Size = view.getUint32(8);
    const idSize = view.getUint16(12);
    const nameSize = view.getUint16(14);
    const extraSize = view.getUint32(36);
    if (extraSize > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `qcow2 snapshot table: too much extra metadata in entry ${index} (${extraSize} bytes)`,
        { offset: snapshotsOffset + at + 36 },
      );
    }
    at += SNAPSHOT_HEADER_SIZE + extraSize;
    const id = cString(await bytesAt(at, idSize));
    at += idSize;
    const name = cString(await bytesAt(at, nameSize));
    at += nameSize;
    snapshots.push({
      id,
      name,
      l1TableOffset,
      l1TableOffsetHex,
      l1TableOffsetLow: l1Low,
      l1Size,
      extraDataSize: extraSize,
    });
  }
  return { snapshots, size: at };
}
