/** `qcow2 convert`'s option parsers, shared by commander's definition and the fast path
 * (fast-paths.ts). */

import { CliError, UsageError } from '../errors.js';
import { parseSize } from '../size.js';

/** The largest `-S` qemu-img takes (a multiple of 512 bytes up to 16 MiB; 0: no zero scan). */
const MAX_SPARSE_SIZE = 16 * 2 ** 20;

/** `-S SIZE`: bytes (size suffixes allowed), a multiple of 512 up to 16 MiB, as qemu-img takes it. */
export function parseSparseSize(text: string): number {
  const size = /^\d+$/.test(text) ? Number(text) : parseSize(text, 'sparse size');
  if (!Number.isSafeInteger(size) || size % 512 !== 0 || size > MAX_SPARSE_SIZE) {
    throw new UsageError(
      `Invalid buffer size for sparse output specified: '${text}' (valid sizes are multiples of 512 up to 16777216)`,
    );
  }
  return size;
}

/** `-l snapshot.name=N`, `-l snapshot.id=I`, `-l X` (id or name), `-s X` (id or name). */
export function parseSnapshotOption(
  l: string | undefined,
  s: string | undefined,
): { id?: string; name?: string; idOrName?: string } | undefined {
  if (l !== undefined && s !== undefined) throw new UsageError('-l and -s cannot be used together');
  if (s !== undefined) return { idOrName: s };
  if (l === undefined) return undefined;
  if (l.startsWith('snapshot.name=')) return { name: l.slice('snapshot.name='.length) };
  if (l.startsWith('snapshot.id=')) return { id: l.slice('snapshot.id='.length) };
  if (l.includes('='))
    throw new UsageError(`Invalid snapshot option '${l}' (use snapshot.name=NAME or snapshot.id=ID)`);
  return { idOrName: l };
}

/**
 * The flag combinations qemu-img convert refuses before looking at any file, in its order and
 * words. `sparseGiven`: `-S` was on the command line (qemu-img refuses it with `-C` even as `-S 4k`).
 */
export function refuseConvertFlags(options: {
  readonly compress?: boolean;
  readonly copyOffload?: boolean;
  readonly sparseGiven?: boolean;
  readonly salvage?: boolean;
}): void {
  if (options.copyOffload !== true) return;
  if (options.compress === true) throw new UsageError('Cannot enable copy offloading when -c is used');
  if (options.sparseGiven === true) throw new UsageError('Cannot enable copy offloading when -S is used');
  if (options.salvage === true) throw new UsageError('Cannot use copy offloading in salvaging mode');
}

/** How convert names a snapshot (`-l`, `-s`). */
export type SnapshotWanted = { id?: string; name?: string; idOrName?: string } | undefined;

/**
 * The refusals qemu-img convert 7.2 makes when given several sources, in its order: a snapshot
 * named by a bare id or name, a backing file for the target, `--bitmaps`. Nothing to refuse for
 * one source.
 */
export function refuseForSeveralSources(
  count: number,
  options: { snapshot?: SnapshotWanted; backing?: boolean; bitmaps?: boolean },
): void {
  if (count <= 1) return;
  if (options.snapshot?.idOrName !== undefined) {
    throw new CliError('No support for concatenating multiple snapshot', { code: 'EINVAL' });
  }
  if (options.backing === true) {
    throw new CliError(
      'Having a backing file for the target makes no sense when concatenating multiple input images',
      { code: 'EINVAL' },
    );
  }
  if (options.bitmaps === true) {
    throw new CliError('Copying bitmaps only possible with single source', { code: 'EINVAL' });
  }
}
