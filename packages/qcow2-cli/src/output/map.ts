/** qemu-img map's layouts: one JSON object per line, or a table of mapped data. */
import type { Extent } from '@qcowkit/blockdev';

export function formatMapJsonEntry(extent: Extent): string {
  const offset = extent.hostOffset === undefined ? '' : `, "offset": ${extent.hostOffset}`;
  return `{ "start": ${extent.offset}, "length": ${extent.length}, "depth": ${extent.depth}, "present": ${extent.present}, "zero": ${extent.zero}, "data": ${extent.data}${offset}}`;
}

export function formatMapHumanHeader(): string {
  return `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
}

export function formatMapHumanRow(extent: Extent, filename: string): string {
  return `${hex(extent.offset).padEnd(16)}${hex(extent.length).padEnd(16)}${hex(extent.hostOffset ?? 0).padEnd(16)}${filename}\n`;
}

/** C's `%#x`: `0` for zero, `0x...` otherwise. */
function hex(value: number): string {
  return value === 0 ? '0' : `0x${value.toString(16)}`;
}
