/**
 * Rewriting the whole header cluster in one write (as QEMU does), from the decoded header with
 * some fields changed. Unknown header extensions and compatible bits are kept; unknown autoclear
 * bits are cleared, as the spec asks of a writer that does not know them.
 */
import { QCOW2_AUTOCLEAR_BITMAPS, QCOW2_AUTOCLEAR_DATA_FILE_RAW } from '../format/feature-bits.js';
import { encodeHeader, type Qcow2HeaderFields } from '../format/header.js';
import type { ImageEdit } from './image-edit.js';

const KNOWN_AUTOCLEAR_LOW = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW;

/** Writes the header with `changes` applied, flushes, and reloads `edit.header`. */
export async function rewriteHeader(edit: ImageEdit, changes: Partial<Qcow2HeaderFields>): Promise<void> {
  const { header } = edit;
  const fields: Qcow2HeaderFields = {
    ...header,
    autoclearFeatures: { high: 0, low: header.autoclearFeatures.low & KNOWN_AUTOCLEAR_LOW },
    extensions: header.extensions.list,
    ...changes,
  };
  await edit.writeHeader(0, encodeHeader(fields));
}
