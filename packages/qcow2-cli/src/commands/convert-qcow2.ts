/**
 * `qcow2 convert -O qcow2`: the source's guest data into a new qcow2 file through qcow2-writer
 * (`convertToQcow2`), with qemu-img's `-o` options (`data_file=PATH[,data_file_raw=on]` included),
 * `-c` (compressed clusters, zlib or zstd), `-B BACKING` (`-F FMT`: only what differs from the
 * backing file is written), `-m N` (reads in flight) and `-p` (progress on stderr). The target may
 * be `-`: the image is streamed to stdout (qemu-img cannot do that). `-n` writes into an existing
 * qcow2 image instead, through qcow2-core, as qemu-img convert -n does. `--bitmaps` copies the
 * source's persistent bitmaps into the target once its data is written (convert-bitmaps.ts).
 * `-t CACHE` decides when the target is flushed: never by default, as qemu-img (convert-cache.ts).
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Writable } from 'node:stream';
import type { BlockDevice, RequestOptions, WriteOptions, WriteZeroesOptions } from '@qcowkit/blockdev';
import { ForwardingBlockDevice } from '@qcowkit/blockdev';
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { type ByteSink, convertToQcow2, copyInto } from '@qcowkit/qcow2-writer/node';
import { type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { type RateLimiter, rateLimiterFor } from '../rate-limit.js';
import type { ConvertOptions } from './convert.js';
import { refuseConvertFlags, refuseForSeveralSources } from './convert-args.js';
import {
  type BitmapCopyOptions,
  bitmapSource,
  checkSourceBitmaps,
  copyBitmaps,
  noBitmapSupport,
} from './convert-bitmaps.js';
import { targetFlush, WriteThroughDevice } from './convert-cache.js';
import { type ConvertSources, openSources, snapshotOfSource } from './convert-sources.js';
import { parseCreateOptions, qcow2CreateOptions } from './create.js';
import { qcow2LayoutOptions } from './measure.js';
import { openAtSnapshot } from './snapshot-select.js';
import { openWritable } from './writable-image.js';

export interface Qcow2ConvertExtras extends BitmapCopyOptions {
  /** `-o` strings, in order. */
  readonly createOptions?: readonly string[];
  /** `-c`. */
  readonly compress?: boolean;
  /** `-B` and `-F`. */
  readonly backingFile?: string | undefined;
  readonly backingFormat?: string | undefined;
  /** `-m`: reads in flight. */
  readonly parallel?: number | undefined;
  /** `-n`: write into the existing target. */
  readonly noCreate?: boolean;
  /** `--target-is-zero` (with `-n`): the target reads as zeros already. */
  readonly targetIsZero?: boolean;
}

/** stdout as a sink that never ends it (it is not ours to close): writes wait for 'drain'. */
function stdoutSink(stream: Writable): ByteSink {
  let failure: Error | undefined;
  const onError = (error: Error) => {
    failure ??= error;
  };
  stream.on('error', onError);
  const settled = (wait: (done: () => void) => void) =>
    new Promise<void>((resolvePromise, reject) => {
      if (failure !== undefined) return reject(failure);
      const fail = (error: Error) => reject(error);
      stream.once('error', fail);
      wait(() => {
        stream.removeListener('error', fail);
        if (failure !== undefined) reject(failure);
        else resolvePromise();
      });
    });
  return {
    async write(chunk) {
      if (failure !== undefined) throw failure;
      if (!stream.write(chunk)) await settled((done) => stream.once('drain', done));
    },
    async close() {
      // Callbacks run in order: once this one has, everything before it is written.
      await settled((done) => stream.write(new Uint8Array(0), () => done()));
      stream.removeListener('error', onError);
    },
    async abort() {
      stream.removeListener('error', onError);
    },
  };
}

/**
 * `-r`: `device` with its writes paced by `limiter` (`'writes'`: the `-n` target, zeros written
 * included, as QEMU's throttle counts every write request to the target by its guest bytes), or
 * its reads (`'reads'`: the source of a new image, whose writer lays out and writes the file
 * itself; the data read is the data qemu-img would write, less the zero blocks inside it).
 */
class RateLimitedDevice extends ForwardingBlockDevice {
  constructor(
    inner: BlockDevice,
    private readonly limiter: RateLimiter,
    private readonly paced: 'reads' | 'writes',
  ) {
    super(inner);
  }

  override async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    if (this.paced === 'reads') await this.limiter.take(length);
    return this.inner.read(offset, length, options);
  }

  override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    if (this.paced === 'reads') await this.limiter.take(buffer.length);
    return this.inner.readInto(buffer, offset, options);
  }

  override async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    if (this.paced === 'writes') await this.limiter.take(data.length);
    return this.inner.write(offset, data, options);
  }

  override async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    if (this.paced === 'writes') await this.limiter.take(length);
    return this.inner.writeZeroes(offset, length, options);
  }

  /** The inner device is its opener's to close. */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The files every source reads: the images of their chains. */
function sourcePaths(sources: ConvertSources): string[] {
  return sources.images.flatMap((opened) => opened.chain.map((layer) => layer.path));
}

/** `-n`: the source's data into the existing qcow2 image `target`. */
async function convertIntoExisting(
  context: CommandContext,
  sources: ConvertSources,
  target: string,
  options: ConvertOptions & Qcow2ConvertExtras,
): Promise<void> {
  const opened = sources.images[0]!;
  if (target === '-') throw new UsageError("-n needs an existing image to write into, not '-'");
  if ((options.createOptions ?? []).length > 0) {
    throw new CliError('-o has no effect when skipping image creation', { code: 'EINVAL' });
  }
  const targetPath = resolveAgainst(context.io.cwd, target);
  const targetStat = await stat(targetPath).catch(() => undefined);
  if (targetStat !== undefined) {
    for (const path of sourcePaths(sources)) {
      const layerStat = await stat(path).catch(() => undefined);
      if (layerStat !== undefined && layerStat.dev === targetStat.dev && layerStat.ino === targetStat.ino) {
        throw new CliError(`Could not write '${target}': it is a file the source image reads (${path})`, {
          code: 'EINVAL',
        });
      }
    }
  }
  const flush = targetFlush(options.cache);
  const writable = await openWritable(targetPath, target, {
    format: 'qcow2',
    noFlush: flush === 'never',
    discardFreedClusters: true,
  });
  try {
    const image = writable.device instanceof Qcow2Image ? writable.device : undefined;
    const writeThrough = flush === 'every-write';
    if (options.bitmaps === true && (image === undefined || image.version < 3))
      throw noBitmapSupport('qcow2');
    if (writable.device.size < sources.device.size) {
      throw new CliError('output file is smaller than input file', { code: 'EINVAL' });
    }
    const progress = progressReporter(context.io, options.progress && options.quiet !== true);
    const limiter = rateLimiterFor(options.rateLimit);
    let into: BlockDevice = writeThrough ? new WriteThroughDevice(writable.device) : writable.device;
    if (limiter !== undefined) into = new RateLimitedDevice(into, limiter, 'writes');
    await copyInto(sources.device, into, {
      ...(options.parallel === undefined ? {} : { readDepth: options.parallel }),
      ...(options.targetIsZero === true ? { targetIsZero: true } : {}),
      ...(options.sparseSize === undefined ? {} : { sparseSize: options.sparseSize }),
      // -C: data copied whole, zero blocks in it included, as qemu-img's copy offloading.
      ...(options.copyOffload === true ? { detectZeroes: false } : {}),
      ...(options.compress === true && image !== undefined
        ? {
            blockBytes: image.clusterSize,
            writeCompressed: async (offset, data) => {
              // QEMU's throttle counts a compressed write by its guest bytes.
              if (limiter !== undefined) await limiter.take(data.length);
              await image.writeCompressed(offset, data);
              if (writeThrough) await image.flush();
            },
          }
        : {}),
      ...(progress === undefined ? {} : { onProgress: (done, total) => progress.update(done, total) }),
    }).catch((error: unknown) => {
      if (error instanceof CliError) throw error;
      throw new CliError(`error while writing into '${target}': ${describeError(error)}`, { cause: error });
    });
    progress?.finish();
    if (options.bitmaps === true) await copyBitmaps(context, bitmapSource(opened.image), image!, options);
  } finally {
    await writable.close();
  }
}

/** qemu-img convert's default `-S`. */
const DEFAULT_SPARSE_SIZE = 4096;

export async function convertToQcow2Command(
  context: CommandContext,
  source: string | readonly string[],
  target: string,
  options: ConvertOptions & Qcow2ConvertExtras,
): Promise<number> {
  refuseConvertFlags({ ...options, sparseGiven: options.sparseSize !== undefined });
  const names = typeof source === 'string' ? [source] : source;
  if (names.length === 0) throw new UsageError('Must specify image file name');
  refuseForSeveralSources(names.length, { snapshot: options.snapshot });
  const openAll = () =>
    openSources(
      context.io,
      names,
      (name, index) =>
        openAtSnapshot(context.io.cwd, name, {
          ...options,
          snapshot: snapshotOfSource(index, names.length, options.snapshot),
        }),
      options,
    );
  if (options.noCreate === true) {
    refuseForSeveralSources(names.length, { bitmaps: options.bitmaps });
    const sources = await openAll();
    try {
      if (options.bitmaps === true) checkSourceBitmaps(bitmapSource(sources.images[0]!.image), options);
      await convertIntoExisting(context, sources, target, options);
    } finally {
      await sources.close();
    }
    return 0;
  }
  const toStdout = target === '-';
  // Only asked for when it is the target: making Node's stdout stream loads its stream modules.
  const stdout = toStdout ? context.io.stdoutStream : undefined;
  if (toStdout && stdout === undefined) {
    throw new CliError("convert: target '-' needs a binary stdout, which this caller did not give", {
      code: 'EUNSUPPORTED',
    });
  }
  if (toStdout && options.bitmaps === true && names.length === 1) {
    throw new UsageError("--bitmaps needs a target file to add the bitmaps to, not stdout ('-')");
  }
  const values = parseCreateOptions(target, 'qcow2', options.createOptions ?? []);
  if (options.backingFile !== undefined) values.set('backing_file', options.backingFile);
  if (options.backingFormat !== undefined) values.set('backing_fmt', options.backingFormat);
  refuseForSeveralSources(names.length, { backing: values.has('backing_file'), bitmaps: options.bitmaps });
  if (values.has('backing_fmt') && !values.has('backing_file')) {
    throw new UsageError('-F requires a backing file (-B)');
  }
  // As qemu-img: a backing file's format is never left to probing later.
  if (values.has('backing_file') && !values.has('backing_fmt')) {
    throw new UsageError('Use of backing file requires explicit backing format');
  }
  const targetPath = toStdout ? undefined : resolveAgainst(context.io.cwd, target);
  const flush = targetFlush(options.cache);
  const sources = await openAll();
  const opened = sources.images[0]!;
  let backing: OpenedImage | undefined;
  try {
    const bitmapsFrom = options.bitmaps === true ? bitmapSource(opened.image) : undefined;
    if (bitmapsFrom !== undefined) checkSourceBitmaps(bitmapsFrom, options);
    const created = qcow2CreateOptions(target, sources.device.size, values);
    if (bitmapsFrom !== undefined && created.compat === '0.10') throw noBitmapSupport('qcow2');
    // The data file's name is recorded as given and resolved against the current folder.
    const dataFilePath =
      created.dataFile === undefined ? undefined : resolveAgainst(context.io.cwd, created.dataFile);
    for (const [path, name] of [
      [targetPath, target],
      [dataFilePath, created.dataFile],
    ] as const) {
      if (
        path !== undefined &&
        sourcePaths(sources).some((layerPath) => resolve(layerPath) === resolve(path))
      ) {
        throw new CliError(`Could not create '${name}': it is the source or a file the source reads`, {
          code: 'EINVAL',
        });
      }
    }
    if (
      dataFilePath !== undefined &&
      targetPath !== undefined &&
      resolve(dataFilePath) === resolve(targetPath)
    ) {
      throw new CliError(`Could not create '${target}': the image and its data file are the same file`, {
        code: 'EINVAL',
      });
    }
    if (created.dataFile !== undefined && options.compress === true) {
      throw new CliError(
        `Could not create '${target}': compression is not supported with an external data file`,
        {
          code: 'EUNSUPPORTED',
        },
      );
    }
    if (created.backingFile !== undefined) {
      // A backing file name is resolved against the image's folder (the current one for stdout).
      const base = targetPath ?? resolveAgainst(context.io.cwd, 'stdout');
      backing = await openImage(pathCombine(base, created.backingFile), {
        displayName: created.backingFile,
        format: created.backingFormat as ImageFormat | undefined,
        forceShare: true,
      }).catch((error: unknown) => {
        throw new CliError(`Could not open backing file '${created.backingFile}': ${describeError(error)}`, {
          cause: error,
        });
      });
    }
    // Progress goes to stderr, never to stdout (which may be the image).
    const progress = progressReporter(context.io, options.progress && options.quiet !== true);
    progress?.update(0, 1);
    const limiter = rateLimiterFor(options.rateLimit);
    const from =
      limiter === undefined ? sources.device : new RateLimitedDevice(sources.device, limiter, 'reads');
    try {
      await convertToQcow2(from, targetPath ?? stdoutSink(stdout!), {
        ...qcow2LayoutOptions(created),
        ...(created.dataFile === undefined ? {} : { dataFile: created.dataFile, dataFilePath }),
        ...(created.dataFileRaw === undefined ? {} : { dataFileRaw: created.dataFileRaw }),
        ...(created.backingFile === undefined ? {} : { backingFile: created.backingFile }),
        ...(created.backingFormat === undefined ? {} : { backingFormat: created.backingFormat }),
        ...(backing === undefined ? {} : { backing: backing.device }),
        ...(options.compress === true ? { compress: true } : {}),
        // qemu-img's default is -S 4k: the same as the writer's default for clusters of 4 KiB
        // and more, not for smaller ones (a data run there is written up to a 4 KiB boundary).
        sparseSize: options.sparseSize ?? DEFAULT_SPARSE_SIZE,
        sourceClusterSize: opened.image?.clusterSize,
        ...(options.parallel === undefined ? {} : { readDepth: options.parallel }),
        ...(progress === undefined ? {} : { onProgress: (done, total) => progress.update(done, total) }),
        // -C: data clusters stored whole, zeros in them included, as qemu-img's copy offloading.
        ...(options.copyOffload === true ? { detectZeroes: false } : {}),
        flush,
      });
    } catch (error) {
      if (error instanceof CliError) throw error;
      throw new CliError(`error while converting qcow2: ${describeError(error)}`, { cause: error });
    }
    progress?.finish();
    if (bitmapsFrom !== undefined)
      await addBitmaps(context, bitmapsFrom, targetPath!, target, { ...options, noFlush: flush === 'never' });
  } finally {
    await backing?.close();
    await sources.close();
  }
  return 0;
}

/** Opens the new image `targetPath` (its data written and closed) and copies the bitmaps into it. */
async function addBitmaps(
  context: CommandContext,
  source: Qcow2Image,
  targetPath: string,
  target: string,
  options: BitmapCopyOptions & { noFlush: boolean },
): Promise<void> {
  const writable = await openWritable(targetPath, target, { format: 'qcow2', noFlush: options.noFlush });
  try {
    await copyBitmaps(context, source, writable.device as Qcow2Image, options);
  } finally {
    await writable.close();
  }
}
