/**
 * The sources of `qcow2 convert SRC... DST`: one image, or several read one after the other as
 * one guest (qemu-img's concatenation: each source's whole guest, in the order given, no padding),
 * optionally salvaged (`--salvage`, salvage-device.ts).
 *
 * What qemu-img 7.2 refuses with several sources is refused here in its words (see
 * `refuseForSeveralSources`); a snapshot named by `-l snapshot.name=` / `snapshot.id=` is loaded in
 * the first source only, as qemu-img loads it.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import { ConcatBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import type { OpenedImage } from '../engine.js';
import type { CliIo } from '../io.js';
import { type SalvageReport, SalvagingBlockDevice, salvageWarning } from '../salvage-device.js';
import { refuseForSeveralSources, type SnapshotWanted } from './convert-args.js';

export interface ConvertSources {
  /** What is copied: the source's guest, or the sources' guests one after the other. */
  readonly device: BlockDevice;
  /** Each source as opened, in order (the first at the snapshot asked). */
  readonly images: readonly OpenedImage[];
  /**
   * The plain file holding the data of an extent of `device` at `guestOffset` reported by layer
   * `depth` (at the extent's `hostOffset`), when that is a plain file device: a raw layer, or a
   * qcow2 image without an external data file. Always undefined when salvaging (every read then
   * goes through the salvaging device).
   */
  hostFile(depth: number, guestOffset: number): FileBlockDevice | undefined;
  close(): Promise<void>;
}

export interface OpenSourcesOptions {
  /** `--salvage`: read failures of the sources read as zeros. */
  readonly salvage?: boolean;
  /** `-q`: salvaged failures are not reported. */
  readonly quiet?: boolean;
}

/** The snapshot source `index` of `count` is opened at: the one asked for the first, none else. */
export function snapshotOfSource(index: number, count: number, snapshot: SnapshotWanted): SnapshotWanted {
  refuseForSeveralSources(count, { snapshot });
  return index === 0 ? snapshot : undefined;
}

/** The file holding a layer's data at the host offsets its extents report, when that is a plain
 * file device: a raw layer, or a qcow2 image without an external data file. */
export function hostFileOf(layer: OpenedImage['chain'][number] | undefined): FileBlockDevice | undefined {
  if (layer === undefined || !(layer.file instanceof FileBlockDevice)) return undefined;
  if (layer.format === 'raw') return layer.file;
  if (layer.format === 'qcow2' && layer.image?.dataFileName === undefined) return layer.file;
  return undefined;
}

/** Prints qemu-img's warning for each salvaged failure on stderr (`qcow2: warning: ...`). */
export function salvageReporter(io: CliIo, quiet: boolean): (report: SalvageReport) => void {
  return quiet ? () => undefined : (report) => io.stderr.write(`qcow2: ${salvageWarning(report)}\n`);
}

/**
 * Opens `names` in order with `open(name, index)` (closing those already open if one fails) and
 * makes the device convert copies.
 */
export async function openSources(
  io: CliIo,
  names: readonly string[],
  open: (name: string, index: number) => Promise<OpenedImage>,
  options: OpenSourcesOptions = {},
): Promise<ConvertSources> {
  const images: OpenedImage[] = [];
  const closeAll = async () => {
    const results = await Promise.allSettled(images.map((image) => image.close()));
    const failure = results.find((result) => result.status === 'rejected');
    if (failure !== undefined) throw failure.reason;
  };
  try {
    for (const [index, name] of names.entries()) images.push(await open(name, index));
  } catch (error) {
    await closeAll().catch(() => undefined);
    throw error;
  }
  const report = options.salvage === true ? salvageReporter(io, options.quiet === true) : undefined;
  // Each source salvaged on its own, so a failure is reported at that source's offset.
  const parts = images.map((image) =>
    report === undefined ? image.device : new SalvagingBlockDevice(image.device, report),
  );
  if (images.length === 1) {
    const only = images[0]!;
    return {
      device: parts[0]!,
      images,
      hostFile: report === undefined ? (depth) => hostFileOf(only.chain[depth]) : () => undefined,
      close: closeAll,
    };
  }
  const concat = new ConcatBlockDevice(parts, { closeParts: false });
  return {
    device: concat,
    images,
    hostFile:
      report === undefined
        ? (depth, guestOffset) => hostFileOf(images[concat.partAt(guestOffset).index]!.chain[depth])
        : () => undefined,
    close: async () => {
      await concat.close();
      await closeAll();
    },
  };
}
