/** `qcow2 snapshot -l | -c NAME | -a NAME | -d NAME`: qemu-img snapshot's actions and messages. */
import { BlockDeviceError, isBlockDeviceError } from '@qcowkit/blockdev';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '@qcowkit/qcow2-core';
import { type ImageFormat, openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { formatSnapshotHeader, formatSnapshotRow } from '../output/info.js';
import { resolveAgainst } from '../paths.js';
import { withImageFileForWrite } from './image-file.js';

export type SnapshotAction =
  | { readonly kind: 'list' }
  | { readonly kind: 'none' }
  | { readonly kind: 'create' | 'apply' | 'delete'; readonly name: string };

export interface SnapshotCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly forceShare: boolean;
  readonly quiet: boolean;
}

/** One of -l, -c, -a, -d (qemu-img: "Cannot mix '-l', '-a', '-c', '-d'"); none of them: qemu-img
 * opens the image and does nothing. */
export function snapshotAction(options: { l?: boolean; c?: string; a?: string; d?: string }): SnapshotAction {
  const given = [
    options.l === true ? ({ kind: 'list' } as const) : undefined,
    options.c === undefined ? undefined : ({ kind: 'create', name: options.c } as const),
    options.a === undefined ? undefined : ({ kind: 'apply', name: options.a } as const),
    options.d === undefined ? undefined : ({ kind: 'delete', name: options.d } as const),
  ].filter((action) => action !== undefined);
  if (given.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
  return given[0] ?? { kind: 'none' };
}

const VERBS = { create: 'create', apply: 'apply', delete: 'delete' } as const;

export async function snapshotCommand(
  context: CommandContext,
  file: string,
  action: SnapshotAction,
  options: SnapshotCommandOptions,
): Promise<number> {
  const path = resolveAgainst(context.io.cwd, file);
  if (action.kind === 'list' || action.kind === 'none') {
    const opened = await openImage(path, {
      displayName: file,
      format: options.format,
      forceShare: options.forceShare,
      openBacking: false,
    });
    try {
      const snapshots = opened.image?.snapshots ?? [];
      if (action.kind === 'list' && snapshots.length > 0 && !options.quiet) {
        const rows = snapshots.map((snapshot) => formatSnapshotRow(snapshot));
        context.io.stdout.write(`Snapshot list:\n${formatSnapshotHeader()}\n${rows.join('\n')}\n`);
      }
    } finally {
      await opened.close();
    }
    return 0;
  }
  const name = action.name;
  await withImageFileForWrite(path, file, options.format, async (device, format) => {
    if (format !== 'qcow2') {
      throw new CliError(`Could not ${VERBS[action.kind]} snapshot '${name}': Operation not supported`, {
        code: 'EUNSUPPORTED',
      });
    }
    try {
      if (action.kind === 'create') await createSnapshot(device, name);
      else if (action.kind === 'apply') await applySnapshot(device, name);
      else {
        // qemu-img snapshot -d finds the snapshot by name only (-a takes an id or a name).
        const victim = (await listSnapshots(device)).find((entry) => entry.name === name);
        if (victim === undefined)
          throw new BlockDeviceError('ENOENT', `snapshot: no snapshot named '${name}'`);
        await deleteSnapshot(device, victim.id);
      }
    } catch (error) {
      // A missing snapshot in qemu-img's words (they differ between -a and -d).
      const missing = isBlockDeviceError(error, 'ENOENT') && action.kind !== 'create';
      const why = !missing
        ? describeError(error)
        : action.kind === 'apply'
          ? 'Failed to load snapshot: No such file or directory'
          : 'snapshot not found';
      throw new CliError(`Could not ${VERBS[action.kind]} snapshot '${name}': ${why}`, {
        cause: error,
      });
    }
  });
  return 0;
}
