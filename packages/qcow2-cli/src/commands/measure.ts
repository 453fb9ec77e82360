/**
 * `qcow2 measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS] (--size SIZE | [-f FMT]
 * [-l SNAPSHOT] FILE)`: what a new image or a conversion needs, through qcow2-writer's `measure`,
 * printed as qemu-img measure prints it.
 */
import type { Qcow2CreateOptions } from '@qcowkit/qcow2-core';
import { measure } from '@qcowkit/qcow2-writer';
import type { ImageFormat } from '../engine.js';
import { UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import type { JsonObject } from '../output/qemu-json.js';
import { toQemuJson } from '../output/qemu-json.js';
import { bitmapList, persistentBitmapsSize } from '../qcow2-bitmaps.js';
import { parseSize } from '../size.js';
import { parseCreateOptions, qcow2CreateOptions } from './create.js';
import { openAtSnapshot } from './snapshot-select.js';

/** qemu-img create's default cluster size (the target's, which the bitmaps are counted in). */
const DEFAULT_CLUSTER_SIZE = 65536;

export interface MeasureCommandOptions {
  readonly output: 'human' | 'json';
  readonly outputFormat: string;
  readonly options: readonly string[];
  readonly size?: string | undefined;
  readonly format?: ImageFormat | undefined;
  readonly snapshot?: { id?: string; name?: string; idOrName?: string } | undefined;
  readonly forceShare: boolean;
}

/** The `-o` layout options (qcow2-core's create options) as qcow2-writer's options: measure's and convert's. */
export function qcow2LayoutOptions(created: Qcow2CreateOptions) {
  return {
    ...(created.compat === undefined
      ? {}
      : { version: created.compat === '0.10' ? (2 as const) : (3 as const) }),
    ...(created.clusterSize === undefined ? {} : { clusterSize: created.clusterSize }),
    ...(created.refcountBits === undefined ? {} : { refcountBits: created.refcountBits }),
    ...(created.extendedL2 === undefined ? {} : { extendedL2: created.extendedL2 }),
    ...(created.lazyRefcounts === undefined ? {} : { lazyRefcounts: created.lazyRefcounts }),
    ...(created.compressionType === undefined ? {} : { compressionType: created.compressionType }),
    ...(created.preallocation === undefined ? {} : { preallocation: created.preallocation }),
  };
}

export async function measureCommand(
  context: CommandContext,
  file: string | undefined,
  options: MeasureCommandOptions,
): Promise<number> {
  if (options.size !== undefined && file !== undefined) {
    throw new UsageError('--size N cannot be used together with a filename.');
  }
  if (options.size === undefined && file === undefined) {
    throw new UsageError('Either --size N or one filename must be specified.');
  }
  const outputFormat = options.outputFormat;
  if (outputFormat !== 'qcow2' && outputFormat !== 'raw') {
    throw new UsageError(`Block driver '${outputFormat}' does not support size measurement`);
  }
  const values = parseCreateOptions('', outputFormat, options.options, '');
  let size: number | undefined;
  if (options.size !== undefined) {
    try {
      size = parseSize(options.size, 'image size');
    } catch {
      throw new UsageError(
        'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
      );
    }
  }
  const created = qcow2CreateOptions('', size ?? 0, values);
  const writerOptions = qcow2LayoutOptions(created);
  let required: number;
  let fullyAllocated: number;
  let bitmaps: number | undefined;
  if (file === undefined) {
    const bytes = Math.ceil(size! / 512) * 512;
    if (outputFormat === 'raw') {
      required = bytes;
      fullyAllocated = bytes;
    } else {
      ({ required, fullyAllocated } = await measure(bytes, writerOptions));
    }
  } else {
    const opened = await openAtSnapshot(context.io.cwd, file, options);
    try {
      if (outputFormat === 'raw') {
        required = opened.device.size;
        fullyAllocated = opened.device.size;
      } else {
        ({ required, fullyAllocated } = await measure(opened.device, writerOptions));
        // qemu-img reports the persistent bitmaps' size when the source is qcow2 (0 without any);
        // a compat=0.10 target cannot hold bitmaps: no figure then.
        const image = opened.image;
        if (opened.format === 'qcow2' && created.compat !== '0.10') {
          const list =
            image?.bitmapDirectory !== undefined && image.header !== undefined && 'extensions' in image.header
              ? bitmapList(image.bitmapDirectory, image.header)
              : [];
          bitmaps = persistentBitmapsSize(
            list,
            opened.device.size,
            created.clusterSize ?? DEFAULT_CLUSTER_SIZE,
          );
        }
      }
    } finally {
      await opened.close();
    }
  }
  // As qemu-img: falloc and full allocate every data cluster up front, so that is what a new
  // image needs (metadata allocates only metadata, which `required` already counts).
  const preallocation = values.get('preallocation');
  if (preallocation === 'falloc' || preallocation === 'full') required = fullyAllocated;
  if (options.output === 'json') {
    const json: JsonObject = { bitmaps, required, 'fully-allocated': fullyAllocated };
    context.io.stdout.write(`${toQemuJson(json)}\n`);
  } else {
    context.io.stdout.write(`required size: ${required}\nfully allocated size: ${fullyAllocated}\n`);
    if (bitmaps !== undefined) context.io.stdout.write(`bitmaps size: ${bitmaps}\n`);
  }
  return 0;
}
