/**
 * `qcow2 convert -O qcow2`: the source's guest data into a new qcow2 file through qcow2-writer
 * (`convertToQcow2`), with qemu-img's `-o` options, `-c` (compressed clusters), `-B BACKING`
 * (`-F FMT`: only what differs from the backing file is written) and `-m N` (reads in flight).
 */
import { resolve } from 'node:path';
import { convertToQcow2 } from '@qcowkit/qcow2-writer/node';
import { type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { ProgressReporter } from '../output/progress.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import type { ConvertOptions } from './convert.js';
import { parseCreateOptions, qcow2CreateOptions } from './create.js';
import { selectSnapshot } from './snapshot-select.js';

export interface Qcow2ConvertExtras {
  /** `-o` strings, in order. */
  readonly createOptions?: readonly string[];
  /** `-c`. */
  readonly compress?: boolean;
  /** `-B` and `-F`. */
  readonly backingFile?: string | undefined;
  readonly backingFormat?: string | undefined;
  /** `-m`: reads in flight. */
  readonly parallel?: number | undefined;
  /** `-n`: the target exists already (not supported yet). */
  readonly noCreate?: boolean;
}

export async function convertToQcow2Command(
  context: CommandContext,
  source: string,
  target: string,
  options: ConvertOptions & Qcow2ConvertExtras,
): Promise<number> {
  if (target === '-') {
    throw new CliError('convert: writing qcow2 to stdout is not supported yet', { code: 'EUNSUPPORTED' });
  }
  if (options.noCreate === true) {
    throw new CliError('convert: -n (writing into an existing image) is not supported yet', {
      code: 'EUNSUPPORTED',
    });
  }
  const values = parseCreateOptions(target, 'qcow2', options.createOptions ?? []);
  if (options.backingFile !== undefined) values.set('backing_file', options.backingFile);
  if (options.backingFormat !== undefined) values.set('backing_fmt', options.backingFormat);
  if (values.has('backing_fmt') && !values.has('backing_file')) {
    throw new UsageError('-F requires a backing file (-B)');
  }
  const sourcePath = resolveAgainst(context.io.cwd, source);
  const targetPath = resolveAgainst(context.io.cwd, target);
  const opened = await openImage(sourcePath, {
    displayName: source,
    format: options.format,
    forceShare: options.forceShare,
    snapshot: await selectSnapshot(sourcePath, source, options),
  });
  let backing: OpenedImage | undefined;
  try {
    if (opened.chain.some((layer) => resolve(layer.path) === resolve(targetPath))) {
      throw new CliError(`Could not create '${target}': it is the source or a file the source reads`, {
        code: 'EINVAL',
      });
    }
    const created = qcow2CreateOptions(target, opened.device.size, values);
    if (created.backingFile !== undefined) {
      backing = await openImage(pathCombine(targetPath, created.backingFile), {
        displayName: created.backingFile,
        format: created.backingFormat as ImageFormat | undefined,
        forceShare: true,
      }).catch((error: unknown) => {
        throw new CliError(`Could not open backing file '${created.backingFile}': ${describeError(error)}`, {
          cause: error,
        });
      });
    }
    const progress = options.progress ? new ProgressReporter(context.io.stderr) : undefined;
    progress?.update(0, 1);
    try {
      await convertToQcow2(opened.device, targetPath, {
        ...(created.compat === undefined
          ? {}
          : { version: created.compat === '0.10' ? (2 as const) : (3 as const) }),
        ...(created.clusterSize === undefined ? {} : { clusterSize: created.clusterSize }),
        ...(created.refcountBits === undefined ? {} : { refcountBits: created.refcountBits }),
        ...(created.extendedL2 === undefined ? {} : { extendedL2: created.extendedL2 }),
        ...(created.lazyRefcounts === undefined ? {} : { lazyRefcounts: created.lazyRefcounts }),
        ...(created.compressionType === undefined ? {} : { compressionType: created.compressionType }),
        ...(created.preallocation === undefined ? {} : { preallocation: created.preallocation }),
        ...(created.dataFile === undefined ? {} : { dataFile: created.dataFile }),
        ...(created.dataFileRaw === undefined ? {} : { dataFileRaw: created.dataFileRaw }),
        ...(created.backingFile === undefined ? {} : { backingFile: created.backingFile }),
        ...(created.backingFormat === undefined ? {} : { backingFormat: created.backingFormat }),
        ...(backing === undefined ? {} : { backing: backing.device }),
        ...(options.compress === true ? { compress: true } : {}),
        ...(options.parallel === undefined ? {} : { readDepth: options.parallel }),
      });
    } catch (error) {
      if (error instanceof CliError) throw error;
      throw new CliError(`error while converting qcow2: ${describeError(error)}`, { cause: error });
    }
    progress?.finish();
  } finally {
    await backing?.close();
    await opened.close();
  }
  return 0;
}
