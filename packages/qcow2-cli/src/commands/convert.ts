/**
 * `qcow2 convert -O raw`: copies the guest's bytes into a sparse raw file.
 *
 * Block status first: ranges the source reports as zeros are never read and stay holes in the new
 * file. Data ranges are read in chunks by a few workers (bounded memory), and each 4 KiB block of
 * the guest that reads as all zeros is skipped too, as qemu-img does by default (`-S 4k`).
 */
import { open, stat } from 'node:fs/promises';
import type { BlockDevice } from '@qcowkit/blockdev';
import type { ImageFormat, OpenedImage } from '../engine.js';
import { openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import { walkExtents } from '../extents.js';
import type { CommandContext } from '../io.js';
import { ProgressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';

export interface ConvertOptions {
  readonly format?: ImageFormat | undefined;
  readonly outputFormat: string;
  /** `-l`/`-s`: a snapshot by id, by name, or by either (id first, as qemu-img does). */
  readonly snapshot?: { id?: string; name?: string; idOrName?: string } | undefined;
  readonly progress: boolean;
  readonly forceShare: boolean;
  /** Bytes per read (default 2 MiB) and reads in flight (default 4): memory is their product. */
  readonly chunkSize?: number;
  readonly parallel?: number;
}

/** qemu-img's default minimum run of zeros that becomes a hole. */
export const SPARSE_BLOCK = 4096;
const DEFAULT_CHUNK = 2 * 2 ** 20;
const DEFAULT_PARALLEL = 4;
export async function convertCommand(
  context: CommandContext,
  source: string,
  target: string,
  options: ConvertOptions,
): Promise<number> {
  if (options.outputFormat === 'qcow2')
    return (await import('./convert-qcow2.js')).convertToQcow2Command(context, source, target, options);
  if (options.outputFormat !== 'raw') {
    throw new UsageError(`convert: output format '${options.outputFormat}' is not supported yet (only raw)`);
  }
  const sourcePath = resolveAgainst(context.io.cwd, source);
  const snapshot = await resolveSnapshot(sourcePath, source, options);
  const opened = await openImage(sourcePath, {
    displayName: source,
    format: options.format,
    forceShare: options.forceShare,
    snapshot,
  });
  try {
    const targetPath = resolveAgainst(context.io.cwd, target);
    await refuseOverwritingSource(targetPath, target, opened);
    const progress = options.progress ? new ProgressReporter(context.io.stderr) : undefined;
    await convertToRaw(opened.device, targetPath, target, {
      chunkSize: options.chunkSize ?? DEFAULT_CHUNK,
      parallel: options.parallel ?? DEFAULT_PARALLEL,
      onProgress: progress === undefined ? undefined : (done, total) => progress.update(done, total),
    });
    progress?.finish();
  } finally {
    await opened.close();
  }
  return 0;
}

/** Creating the target truncates it: refuse when it is the source or any file the source reads
 * (a backing file, an external data file), and anything but a regular file. */
async function refuseOverwritingSource(
  targetPath: string,
  target: string,
  opened: OpenedImage,
): Promise<void> {
  const targetStat = await stat(targetPath).catch(() => undefined);
  if (targetStat === undefined) return;
  if (!targetStat.isFile()) {
    throw new CliError(
      `Could not create '${target}': not a regular file (block devices are not supported yet)`,
      {
        code: 'EUNSUPPORTED',
      },
    );
  }
  const sources = opened.chain.flatMap((layer) => [layer.path, ...dataFilePath(layer)]);
  for (const sourcePath of sources) {
    const sourceStat = await stat(sourcePath).catch(() => undefined);
    if (sourceStat !== undefined && sourceStat.dev === targetStat.dev && sourceStat.ino === targetStat.ino) {
      throw new CliError(
        `Could not create '${target}': it is a file the source image reads (${sourcePath})`,
        {
          code: 'EINVAL',
        },
      );
    }
  }
}

function dataFilePath(layer: OpenedImage['chain'][number]): string[] {
  const name = layer.image?.dataFileName;
  return name === undefined ? [] : [name];
}

/** Turns `-l`/`-s` into the snapshot's id, looking names up in the image's snapshot table. */
async function resolveSnapshot(
  sourcePath: string,
  source: string,
  options: ConvertOptions,
): Promise<{ id?: string; name?: string } | undefined> {
  const wanted = options.snapshot;
  if (wanted === undefined) return undefined;
  const probe: OpenedImage = await openImage(sourcePath, {
    displayName: source,
    format: options.format,
    forceShare: options.forceShare,
    openBacking: false,
  });
  try {
    const snapshots = probe.image?.snapshots ?? [];
    const found =
      wanted.id !== undefined
        ? snapshots.find((s) => s.id === wanted.id)
        : wanted.name !== undefined
          ? snapshots.find((s) => s.name === wanted.name)
          : (snapshots.find((s) => s.id === wanted.idOrName) ??
            snapshots.find((s) => s.name === wanted.idOrName));
    if (found === undefined)
      throw new CliError("Failed to load snapshot: Can't find snapshot", { code: 'ENOENT' });
    return { id: found.id };
  } finally {
    await probe.close();
  }
}

export interface ConvertToRawOptions {
  readonly chunkSize: number;
  readonly parallel: number;
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
}

/** Writes every non-zero 4 KiB block of `device` into a new sparse raw file at `targetPath`. */
export async function convertToRaw(
  device: BlockDevice,
  targetPath: string,
  targetName: string,
  options: ConvertToRawOptions,
): Promise<void> {
  let handle: import('node:fs/promises').FileHandle;
  try {
    handle = await open(targetPath, 'w');
    await handle.truncate(device.size);
  } catch (error) {
    throw new CliError(`Could not create '${targetName}': ${describeError(error)}`, {
      cause: error,
    });
  }
  try {
    const size = device.size;
    let done = 0;
    const report = () => options.onProgress?.(done, size);
    report();
    const chunkSize = Math.max(SPARSE_BLOCK, options.chunkSize - (options.chunkSize % SPARSE_BLOCK));
    const tasks = dataChunks(device, chunkSize, (skipped) => {
      done += skipped;
      report();
    });
    // On the first failure the other workers stop taking work; every worker has finished before
    // the file is closed, so no write lands on a closed handle.
    let failed = false;
    const worker = async () => {
      // Its own ArrayBuffer (never the shared pool): offset 0, so 32-bit views line up.
      const buffer = Buffer.allocUnsafeSlow(chunkSize);
      try {
        while (!failed) {
          const next = await tasks.next();
          if (next.done) return;
          const { offset, length } = next.value;
          const view = buffer.subarray(0, length);
          await device.readInto(view, offset);
          await writeNonZero(handle, view, offset, targetName);
          done += length;
          report();
        }
      } catch (error) {
        failed = true;
        throw error;
      }
    };
    const results = await Promise.allSettled(Array.from({ length: Math.max(1, options.parallel) }, worker));
    const failure = results.find((result) => result.status === 'rejected');
    if (failure !== undefined) throw failure.reason;
  } finally {
    await handle.close();
  }
}

/**
 * The data ranges of `device` cut into chunks that start on 4 KiB boundaries of the guest, as an
 * async iterator safe to share between workers. Zero ranges are reported to `onSkip`.
 */
function dataChunks(
  device: BlockDevice,
  chunkSize: number,
  onSkip: (bytes: number) => void,
): { next(): Promise<IteratorResult<{ offset: number; length: number }>> } {
  const generator = (async function* () {
    for await (const extent of walkExtents(device, 0, device.size)) {
      const end = extent.offset + extent.length;
      if (extent.zero) {
        onSkip(extent.length);
        continue;
      }
      let offset = extent.offset;
      while (offset < end) {
        const chunkEnd = Math.min(end, offset - (offset % chunkSize) + chunkSize);
        yield { offset, length: chunkEnd - offset };
        offset = chunkEnd;
      }
    }
  })();
  // Workers call next() concurrently: serialise the calls so the generator never runs twice at once.
  let last: Promise<unknown> = Promise.resolve();
  return {
    next() {
      const result = last.then(() => generator.next());
      last = result.catch(() => undefined);
      return result;
    },
  };
}

const ZERO_BLOCK = Buffer.alloc(SPARSE_BLOCK);

/**
 * True when `data[start, end)` is all zeros. Data blocks almost always have a non-zero byte among
 * their first sixteen, so those are looked at first as four 32-bit words (no native call); only
 * blocks that start with zeros are compared in full.
 */
function isZeroBlock(data: Buffer, words: Uint32Array, start: number, end: number): boolean {
  if (start % 4 === 0 && (start >> 2) + 4 <= words.length) {
    const word = start >> 2;
    if ((words[word]! | words[word + 1]! | words[word + 2]! | words[word + 3]!) !== 0) return false;
  }
  return data.subarray(start, end).equals(ZERO_BLOCK.subarray(0, end - start));
}

/** Writes the runs of `data` (guest bytes at `guestOffset`) whose 4 KiB guest blocks hold a non-zero
 * byte; all-zero blocks stay holes. */
async function writeNonZero(
  handle: import('node:fs/promises').FileHandle,
  data: Buffer,
  guestOffset: number,
  targetName: string,
): Promise<void> {
  const words =
    data.byteOffset % 4 === 0
      ? new Uint32Array(data.buffer, data.byteOffset, data.length >> 2)
      : new Uint32Array(0);
  let runStart = -1;
  let index = 0;
  while (index < data.length) {
    const blockEnd = Math.min(data.length, index + SPARSE_BLOCK - ((guestOffset + index) % SPARSE_BLOCK));
    if (isZeroBlock(data, words, index, blockEnd)) {
      if (runStart >= 0) {
        await writeAll(handle, data.subarray(runStart, index), guestOffset + runStart, targetName);
      }
      runStart = -1;
    } else if (runStart < 0) {
      runStart = index;
    }
    index = blockEnd;
  }
  if (runStart >= 0) await writeAll(handle, data.subarray(runStart), guestOffset + runStart, targetName);
}

async function writeAll(
  handle: import('node:fs/promises').FileHandle,
  data: Buffer,
  position: number,
  targetName: string,
): Promise<void> {
  let written = 0;
  try {
    while (written < data.length) {
      const { bytesWritten } = await handle.write(data, written, data.length - written, position + written);
      written += bytesWritten;
    }
  } catch (error) {
    throw new CliError(
      `error while writing at byte ${position + written} of '${targetName}': ${describeError(error)}`,
      {
        cause: error,
      },
    );
  }
}
