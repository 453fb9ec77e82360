/**
 * Extents as qemu-img map shows them. The engine's block status describes what each layer holds;
 * QEMU's view differs in three ways this module applies:
 * - a raw layer holds every byte inside its size, holes included: QEMU reports those bytes
 *   present, at the same offset in the file;
 * - past the end of a shorter backing file, the layer above answers (zeros, not present, the
 *   depth of that layer);
 * - QEMU 7.2 has no `compressed` field, so compressed runs merge like any other data.
 */
import type { Extent } from '@qcowkit/blockdev';

/** What the view needs of each chain layer, top first. */
export interface MapLayer {
  readonly format: 'qcow2' | 'qcow' | 'raw';
  /** Guest size of the layer. */
  readonly size: number;
}

/** `extent` in QEMU's terms; may split it where a backing file ends. */
export function qemuMapView(extent: Extent, layers: readonly MapLayer[]): Extent[] {
  const { compressed: _compressed, ...plain } = extent;
  if (plain.present) return [plain];
  const out: Extent[] = [];
  let offset = plain.offset;
  const end = plain.offset + plain.length;
  while (offset < end) {
    // Walk down while the next layer still covers `offset`; past a backing file's end the layer
    // above it answers.
    let depth = 0;
    while (depth + 1 < layers.length && offset < layers[depth + 1]!.size) depth++;
    const pieceEnd = depth > 0 ? Math.min(end, layers[depth]!.size) : end;
    const piece = { ...plain, offset, length: pieceEnd - offset, depth };
    if (layers[depth]?.format === 'raw') {
      out.push({ ...piece, present: true, hostOffset: offset });
    } else if (plain.hostOffset !== undefined) {
      // An unallocated subcluster of an allocated cluster keeps its host offset, as in QEMU.
      out.push({ ...piece, hostOffset: plain.hostOffset + (offset - plain.offset) });
    } else {
      out.push(piece);
    }
    offset = pieceEnd;
  }
  return out;
}
