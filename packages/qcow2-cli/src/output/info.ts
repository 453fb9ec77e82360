/** qemu-img info's two layouts: JSON (field names as QEMU's) and the human text. */
import type { SnapshotInfo } from '../engine.js';
import { formatHumanSize } from '../size.js';
import type { JsonObject, JsonValue } from './qemu-json.js';
import { qdictKeyOrder } from './qemu-json.js';

export interface Qcow2SpecificInfo {
  readonly version: 2 | 3;
  readonly compressionType: 'zlib' | 'zstd';
  readonly lazyRefcounts: boolean;
  readonly refcountBits: number;
  readonly corrupt: boolean;
  readonly extendedL2: boolean;
  readonly dataFile: string | undefined;
  readonly dataFileRaw: boolean;
  readonly bitmaps: readonly { name: string; granularity: number; flags: readonly string[] }[] | undefined;
}

/** Everything info prints about one image of a chain. */
export interface ImageInfo {
  readonly filename: string;
  readonly format: string;
  readonly virtualSize: number;
  readonly actualSize: number | undefined;
  readonly clusterSize: number | undefined;
  readonly dirty: boolean;
  readonly encrypted: boolean;
  readonly backingFilename: string | undefined;
  readonly fullBackingFilename: string | undefined;
  readonly backingFormat: string | undefined;
  readonly snapshots: readonly SnapshotInfo[];
  readonly qcow2: Qcow2SpecificInfo | undefined;
}

export function snapshotToJson(snapshot: SnapshotInfo): JsonObject {
  return {
    id: snapshot.id,
    name: snapshot.name,
    'vm-state-size': snapshot.vmStateSize,
    'date-sec': snapshot.dateSec,
    'date-nsec': snapshot.dateNsec,
    'vm-clock-sec': Math.floor(snapshot.vmClockNsec / 1e9),
    'vm-clock-nsec': snapshot.vmClockNsec % 1e9,
    icount: snapshot.icount,
  };
}

/** The `data` of `format-specific` for qcow2, as QEMU fills it (version 2 images have fewer fields). */
export function qcow2SpecificToJson(info: Qcow2SpecificInfo): JsonObject {
  const data: Record<string, JsonValue | undefined> = {
    compat: info.version === 2 ? '0.10' : '1.1',
    'compression-type': info.compressionType,
    'refcount-bits': info.refcountBits,
  };
  if (info.version === 3) {
    data['lazy-refcounts'] = info.lazyRefcounts;
    if (info.bitmaps !== undefined && info.bitmaps.length > 0) {
      data.bitmaps = info.bitmaps.map((bitmap) => ({
        flags: [...bitmap.flags],
        name: bitmap.name,
        granularity: bitmap.granularity,
      }));
    }
    if (info.dataFile !== undefined) {
      data['data-file'] = info.dataFile;
      data['data-file-raw'] = info.dataFileRaw;
    }
    data.corrupt = info.corrupt;
    data['extended-l2'] = info.extendedL2;
  }
  return data;
}

export function infoToJson(info: ImageInfo): JsonObject {
  return {
    'virtual-size': info.virtualSize,
    filename: info.filename,
    format: info.format,
    'actual-size': info.actualSize,
    'cluster-size': info.clusterSize,
    encrypted: info.encrypted ? true : undefined,
    'dirty-flag': info.dirty,
    'backing-filename': info.backingFilename,
    'full-backing-filename': info.fullBackingFilename,
    'backing-filename-format': info.backingFormat,
    snapshots: info.snapshots.length > 0 ? info.snapshots.map(snapshotToJson) : undefined,
    'format-specific':
      info.qcow2 === undefined ? undefined : { type: 'qcow2', data: qcow2SpecificToJson(info.qcow2) },
  };
}

/** The human layout of one image, ending with a newline. */
export function formatInfoHuman(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatHumanSize(info.virtualSize)} (${info.virtualSize} bytes)`,
    `disk size: ${info.actualSize === undefined ? 'unavailable' : formatHumanSize(info.actualSize)}`,
  ];
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.encrypted) lines.push('encrypted: yes');
  if (info.dirty) lines.push('cleanly shut down: no');
  if (info.backingFilename !== undefined) {
    const full = info.fullBackingFilename;
    lines.push(
      full !== undefined && full !== info.backingFilename
        ? `backing file: ${info.backingFilename} (actual path: ${full})`
        : `backing file: ${info.backingFilename}`,
    );
    if (info.backingFormat !== undefined) lines.push(`backing file format: ${info.backingFormat}`);
  }
  if (info.snapshots.length > 0) {
    lines.push('Snapshot list:', formatSnapshotHeader(), ...info.snapshots.map(formatSnapshotRow));
  }
  if (info.qcow2 !== undefined) {
    lines.push('Format specific information:');
    dumpValue(qcow2SpecificToJson(info.qcow2), 1, lines);
  }
  return `${lines.join('\n')}\n`;
}

export function formatSnapshotHeader(): string {
  return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
}

export function formatSnapshotRow(snapshot: SnapshotInfo): string {
  const date = new Date(snapshot.dateSec * 1000);
  const pad2 = (n: number) => String(n).padStart(2, '0');
  const dateText = `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`;
  const totalSeconds = Math.floor(snapshot.vmClockNsec / 1e9);
  const millis = Math.floor(snapshot.vmClockNsec / 1e6) % 1000;
  const clock = `${pad2(Math.floor(totalSeconds / 3600))}:${pad2(Math.floor(totalSeconds / 60) % 60)}:${pad2(totalSeconds % 60)}.${String(millis).padStart(3, '0')}`;
  const icount = snapshot.icount === undefined ? '--' : String(snapshot.icount);
  return `${snapshot.id.padEnd(9)} ${snapshot.name.padEnd(16)} ${formatHumanSize(snapshot.vmStateSize).padStart(8)}${dateText.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** QEMU's dump of a QObject for people: `key: value`, nested values indented by 4, lists as `[i]:`. */
function dumpValue(value: JsonObject, indent: number, lines: string[]): void {
  for (const key of qdictKeyOrder(Object.keys(value))) {
    const member = value[key];
    if (member === undefined) continue;
    dumpMember(key.replaceAll('-', ' '), member, indent, lines);
  }
}

function dumpMember(label: string, value: JsonValue, indent: number, lines: string[]): void {
  const prefix = ' '.repeat(indent * 4);
  if (value === null || typeof value !== 'object') {
    lines.push(`${prefix}${label}: ${String(value)}`);
    return;
  }
  lines.push(`${prefix}${label}:`);
  if (Array.isArray(value)) {
    (value as readonly JsonValue[]).forEach((item, index) => {
      dumpMember(`[${index}]`, item, indent + 1, lines);
    });
  } else {
    dumpValue(value as JsonObject, indent + 1, lines);
  }
}
