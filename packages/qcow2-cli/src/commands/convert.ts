/**
 * `qcow2 convert -O raw`: copies the guest's bytes into a sparse raw file, into an existing file
 * (`-n`), or onto stdout (target `-`).
 *
 * Block status first: ranges the source reports as zeros are never read and stay holes in the new
 * file. Data ranges are read ahead into a few reusable buffers (bounded memory; straight from the
 * file holding them where they lie there in order, see convert-pipeline.ts) and written in guest
 * order, one write at a time (on the main thread when the target is a regular file on tmpfs or
 * ramfs, where a write cannot block; on libuv's pool elsewhere); each 4 KiB block of the guest that reads as all zeros is skipped
 * too, as qemu-img does by default (`-S 4k`).
 *
 * The target is never flushed by default, as qemu-img convert's default cache mode (`-t unsafe`)
 * does; `-t` asks for a flush at the end or after every write (convert-cache.ts).
 *
 * `-n` writes into the existing file as qemu-img does: the file must be at least as large as the
 * guest (bytes past the guest's end are left alone), and every range the guest reads as zeros
 * becomes zeros in the file too: the file's range is punched first when it can punch holes, else
 * zeros are written only where the file holds data. Stdout gets every byte in order, zeros
 * included; reads still run ahead in parallel.
 */
import { stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Writable } from 'node:stream';
import { type BlockDevice, isBlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice, isMemoryBacked } from '@qcowkit/blockdev/node';
import type { FileFlush } from '@qcowkit/qcow2-writer/node';
import type { ImageFormat, OpenedImage } from '../engine.js';
import { openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import { walkExtents } from '../extents.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';
import { type RateLimiter, rateLimiterFor } from '../rate-limit.js';
import { refuseConvertFlags } from './convert-args.js';
import { targetFlush } from './convert-cache.js';
import { forEachDataRun, planReads, type ReadJob, readBufferSize, runCopy } from './convert-pipeline.js';
import { openSources, snapshotOfSource } from './convert-sources.js';
import { parseCreateOptions, preallocateRaw } from './create.js';

export interface ConvertOptions {
  readonly format?: ImageFormat | undefined;
  readonly outputFormat: string;
  /** `-l`/`-s`: a snapshot by id, by name, or by either (id first, as qemu-img does). */
  readonly snapshot?: { id?: string; name?: string; idOrName?: string } | undefined;
  readonly progress: boolean;
  readonly forceShare: boolean;
  /** `-n`: write into the existing target instead of creating it. */
  readonly noCreate?: boolean;
  /** `--target-is-zero` (only with `-n`): the target reads as zeros already; nothing is zeroed. */
  readonly targetIsZero?: boolean;
  /** `-S`: runs of this many zero bytes (aligned in the guest) become holes; 0: no zero scan at
   * all, the target fully allocated. Default 4 KiB, as qemu-img's. */
  readonly sparseSize?: number;
  /** `-m`: reads in flight (default 4), each into a buffer of 4 MiB plus up to 64 KiB of gaps. */
  readonly parallel?: number;
  /** `-t`: the target's cache mode, as qemu-img names them (default `unsafe`: never flushed; see
   * convert-cache.ts). `-T` is checked by the parsers and changes nothing. */
  readonly cache?: string | undefined;
  /** `-o`: creation options of the target (for raw: `preallocation=off|falloc|full`; `size` is
   * accepted and, as with qemu-img, the guest's size wins). */
  readonly createOptions?: readonly string[] | undefined;
  /** `-q`: nothing on stderr but errors (no progress, no salvage warnings). */
  readonly quiet?: boolean;
  /** `--salvage`: what cannot be read of the sources becomes zeros in the target, each failing
   * 512-byte sector reported on stderr (unless `quiet`), as qemu-img convert --salvage does. */
  readonly salvage?: boolean;
  /** `-C`: copy offloading, as qemu-img's: data ranges are copied whole (no zero scan inside
   * them), file to file in the kernel (copy_file_range) where they lie in a plain file; ranges
   * the source reports as zeros stay holes (a new target) or are zeroed (`-n`). */
  readonly copyOffload?: boolean;
  /** `-r`: at most this many bytes a second written to the target (0 or undefined: no limit). */
  readonly rateLimit?: number | undefined;
}

/** `-o` of a raw target: its preallocation, checked as qemu-img checks it. */
function rawTargetPreallocation(
  target: string,
  list: readonly string[],
  noCreate: boolean,
): 'falloc' | 'full' | undefined {
  const values = parseCreateOptions(target, 'raw', list, '');
  if (values.size > 0 && noCreate) throw new UsageError('-o has no effect when skipping image creation');
  const mode = values.get('preallocation') ?? 'off';
  if (mode === 'off') return undefined;
  if (mode === 'falloc' || mode === 'full') return mode;
  throw new CliError(
    `${target}: error while converting raw: ${mode === 'metadata' ? 'Unsupported preallocation mode: metadata' : `invalid parameter value: ${mode}`}`,
    { code: 'EINVAL' },
  );
}

/** qemu-img's default minimum run of zeros that becomes a hole (`-S 4k`). */
const SPARSE_BLOCK = 4096;

/**
 * Bytes a read starts with. 4 MiB rather than 2: each read is a hand-off to libuv's pool (a wake of
 * a sleeping thread, ~0.1 ms of the main thread here), and half as many of them measured 0.31-0.34
 * s against 0.33-0.37 s for a 1 GiB guest holding 512 MiB (64 KiB clusters, /dev/shm, 4 quiet runs
 * of 9-15 alternating rounds; qemu-img 0.30-0.32 s); against the previous build in 13 and 21
 * alternating rounds, 340 and 344 ms against 339 and 354: at most a small gain. 8 MiB more of
 * buffers (peak RSS 58 -> 67 MiB). 8 MiB reads were no better.
 */
const DEFAULT_CHUNK = 4 * 2 ** 20;
const DEFAULT_PARALLEL = 4;
export async function convertCommand(
  context: CommandContext,
  source: string | readonly string[],
  target: string,
  options: ConvertOptions,
): Promise<number> {
  if (options.outputFormat === 'qcow2')
    return (await import('./convert-qcow2.js')).convertToQcow2Command(context, source, target, options);
  if (options.outputFormat !== 'raw') {
    throw new UsageError(`convert: output format '${options.outputFormat}' is not supported yet (only raw)`);
  }
  refuseConvertFlags({ ...options, sparseGiven: options.sparseSize !== undefined });
  const names = typeof source === 'string' ? [source] : source;
  if (names.length === 0) throw new UsageError('Must specify image file name');
  const preallocation = rawTargetPreallocation(
    target,
    options.createOptions ?? [],
    options.noCreate === true,
  );
  const sources = await openSources(
    context.io,
    names,
    async (name, index) => {
      const sourcePath = resolveAgainst(context.io.cwd, name);
      const wanted = snapshotOfSource(index, names.length, options.snapshot);
      return openImage(sourcePath, {
        displayName: name,
        format: options.format,
        forceShare: options.forceShare,
        snapshot: await resolveSnapshot(sourcePath, name, { ...options, snapshot: wanted }),
        // Small requests (the image's tables) inline where they are memory copies; data is read in
        // chunks far above this, on the pool.
        syncIoMaxBytes: 'memory-backed',
      });
    },
    options,
  );
  try {
    // Progress goes to stderr, so `-p` never mixes with an image written to stdout.
    const progress = progressReporter(context.io, options.progress && options.quiet !== true);
    const copyOptions = {
      chunkSize: DEFAULT_CHUNK,
      parallel: options.parallel ?? DEFAULT_PARALLEL,
      onProgress:
        progress === undefined ? undefined : (done: number, total: number) => progress.update(done, total),
      rateLimiter: rateLimiterFor(options.rateLimit),
    };
    if (target === '-') {
      const stream = context.io.stdoutStream;
      if (stream === undefined) {
        throw new CliError("convert: target '-' needs a binary stdout, which this caller did not give", {
          code: 'EUNSUPPORTED',
        });
      }
      await convertToStream(sources.device, stream, copyOptions);
    } else {
      const targetPath = resolveAgainst(context.io.cwd, target);
      await refuseOverwritingSource(targetPath, target, sources.images, options.noCreate === true);
      await convertToRaw(sources.device, targetPath, target, {
        ...copyOptions,
        noCreate: options.noCreate === true,
        targetIsZero: options.targetIsZero === true,
        sparseSize: options.sparseSize ?? SPARSE_BLOCK,
        copyOffload: options.copyOffload === true,
        hostFile: sources.hostFile,
        flush: targetFlush(options.cache),
        preallocation,
      });
    }
    progress?.finish();
  } finally {
    await sources.close();
  }
  return 0;
}

/** Creating the target truncates it, and `-n` overwrites it: refuse when it is the source or any
 * file the source reads (a backing file, an external data file). A new target must be a regular
 * file; `-n` also takes a block device. */
async function refuseOverwritingSource(
  targetPath: string,
  target: string,
  images: readonly OpenedImage[],
  noCreate: boolean,
): Promise<void> {
  const targetStat = await stat(targetPath).catch(() => undefined);
  if (targetStat === undefined) return;
  if (!targetStat.isFile() && !(noCreate && targetStat.isBlockDevice())) {
    throw new CliError(
      `Could not create '${target}': not a regular file (block devices are not supported yet)`,
      {
        code: 'EUNSUPPORTED',
      },
    );
  }
  const sources = images.flatMap((opened) =>
    opened.chain.flatMap((layer) => [layer.path, ...dataFilePath(layer)]),
  );
  for (const sourcePath of sources) {
    const sourceStat = await stat(sourcePath).catch(() => undefined);
    if (sourceStat !== undefined && sourceStat.dev === targetStat.dev && sourceStat.ino === targetStat.ino) {
      throw new CliError(
        `Could not ${noCreate ? 'write' : 'create'} '${target}': it is a file the source image reads (${sourcePath})`,
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
  /** `-n`: write into the existing file at `targetPath` instead of creating it. */
  readonly noCreate?: boolean;
  /** `--target-is-zero` (with `-n`): the existing file reads as zeros, nothing is zeroed. */
  readonly targetIsZero?: boolean;
  /** See {@link ConvertOptions.sparseSize} (default 4 KiB). */
  readonly sparseSize?: number;
  /** The file holding the data an extent of the source at `guestOffset` reports at layer `depth`
   * (at its `hostOffset`): data ranges are read from it directly (and with `sparseSize` 0 or
   * `copyOffload` copied file to file, copy_file_range). */
  readonly hostFile?: ((depth: number, guestOffset: number) => FileBlockDevice | undefined) | undefined;
  /** `-C`: data ranges copied whole (copy_file_range where they lie in a plain file), no zero scan;
   * zero ranges left as holes (a new target, `targetIsZero`) or zeroed (`noCreate`). */
  readonly copyOffload?: boolean;
  /** `-r`: paces the writes to the target (zeros written count; holes left do not). */
  readonly rateLimiter?: RateLimiter | undefined;
  /** Write the target on this thread rather than on libuv's pool (see convert-pipeline.ts for
   * why). Default: when the target is a regular file on a memory-backed file system. */
  readonly inlineWrites?: boolean | undefined;
  /** When the target is flushed to stable storage (default `'on-close'`; `qcow2 convert` passes
   * what `-t` asks, `'never'` by default as qemu-img). */
  readonly flush?: FileFlush | undefined;
  /** A new target's data area allocated before the copy: `falloc` (fallocate) or `full` (zeros
   * written), as `create -o preallocation=` does (`-o preallocation=` of convert). */
  readonly preallocation?: 'falloc' | 'full' | undefined;
}

/** Short wordings of system errors, as qemu-img prints them after `Could not create 'X': `. */
const SYSTEM_WORDS: Partial<Record<string, string>> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EBUSY: 'Failed to get "write" lock (is another process using the image?)',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
};

function why(error: unknown): string {
  return (isBlockDeviceError(error) && SYSTEM_WORDS[error.code]) || describeError(error);
}

/**
 * Whether `path` is a regular file on a memory-backed file system (tmpfs, ramfs); one that does
 * not exist yet (a target about to be created) is judged by its folder when `orFolder` is set. A
 * folder is not (isMemoryBacked already says no for device nodes).
 */
export async function isMemoryBackedFile(path: string, orFolder = false): Promise<boolean> {
  const stats = await stat(path).catch(() => undefined);
  if (stats === undefined) return orFolder && isMemoryBacked(dirname(path));
  return stats.isFile() && isMemoryBacked(path);
}

/**
 * Opens (`-n`) or creates the raw target, sized to the guest: holes everywhere when created.
 * Requests up to `syncIoMaxBytes` are done on this thread; with `noFlush` nothing is ever flushed,
 * closing included.
 */
async function openTarget(
  targetPath: string,
  targetName: string,
  size: number,
  noCreate: boolean,
  syncIoMaxBytes: number,
  noFlush: boolean,
) {
  if (!noCreate) {
    try {
      return await FileBlockDevice.create(targetPath, size, { overwrite: true, syncIoMaxBytes, noFlush });
    } catch (error) {
      throw new CliError(`Could not create '${targetName}': ${why(error)}`, { cause: error });
    }
  }
  let file: FileBlockDevice;
  try {
    file = await FileBlockDevice.open(targetPath, { syncIoMaxBytes, noFlush });
  } catch (error) {
    throw new CliError(`Could not open '${targetName}': ${why(error)}`, { cause: error });
  }
  if (file.size < size) {
    await file.close();
    throw new CliError('output file is smaller than input file', { code: 'EINVAL' });
  }
  return file;
}

/**
 * Writes every non-zero 4 KiB block of `device` into a raw file at `targetPath`: a new sparse file,
 * or with `noCreate` the existing file, whose first `device.size` bytes end up equal to the guest.
 */
export async function convertToRaw(
  device: BlockDevice,
  targetPath: string,
  targetName: string,
  options: ConvertToRawOptions,
): Promise<void> {
  const noCreate = options.noCreate === true;
  const sparseSize = options.sparseSize ?? SPARSE_BLOCK;
  const limiter = options.rateLimiter;
  /** Data ranges copied whole, without the zero scan (`-S 0`, `-C`). */
  const copyWhole = sparseSize === 0 || options.copyOffload === true;
  const flush = options.flush ?? 'on-close';
  /** Every write durable when it resolves (`-t writethrough`). */
  const fua = flush === 'every-write';
  // The default path's reads and writes: buffers of this many bytes (-S 0 copies file to file).
  const chunkSize = wholeBlocks(options.chunkSize, sparseSize || SPARSE_BLOCK);
  const size = device.size;
  let done = 0;
  const report = () => options.onProgress?.(done, size);
  report();
  let file: FileBlockDevice | undefined;
  /** Zero ranges of the guest are zeroed in the target as they come (`-n`, see below). */
  let zeroInTarget = false;
  /** Zero ranges of the guest are zeros qemu-img writes into the target (`-n`): `-r` counts them. */
  const mustZero = noCreate && options.targetIsZero !== true;
  const next = copyWhole
    ? undefined
    : planReads(device, {
        chunkSize,
        hostFile: options.hostFile,
        onZero: async (offset, length) => {
          if (zeroInTarget) await zeroTarget(file!, targetName, offset, length, false, fua, limiter);
          else if (mustZero && limiter !== undefined) await limiter.take(length);
          done += length;
          report();
        },
      });
  // A new file needs nothing done to it before the first read: the first block-status lookup
  // (the image's first L2 tables, and its test for metadata preallocation, 5-40 ms when the code
  // is cold) runs while the file is made. `-n` may have zeros to write first: it waits.
  const first = next !== undefined && !noCreate ? next() : undefined;
  first?.catch(() => undefined); // observed below
  try {
    const inline = !copyWhole && (options.inlineWrites ?? (await isMemoryBackedFile(targetPath, !noCreate)));
    file = await openTarget(
      targetPath,
      targetName,
      size,
      noCreate,
      inline ? readBufferSize(chunkSize) : 0,
      flush === 'never',
    );
  } catch (error) {
    await first?.catch(() => undefined);
    throw error;
  }
  const target = file;
  let failure: unknown;
  try {
    if (options.preallocation !== undefined && !noCreate) await preallocateRaw(target, options.preallocation);
    if (next === undefined) {
      // -S 0 allocates the zeros; -C leaves them alone in a new file and zeroes them with -n.
      const zeros = sparseSize === 0 ? 'allocate' : mustZero ? 'punch' : 'skip';
      await copyAllocated(device, target, targetName, options, fua, zeros, (length) => {
        done += length;
        report();
      });
      return;
    }
    // An existing file: zero the guest's range in one go where that is cheap (a punched hole), so
    // what follows is the same as for a new file. Otherwise zeros go where the source has them.
    // With --target-is-zero the file is taken at its word: as for a new file, nothing is zeroed.
    // (-r counts the zeros as the copy reaches them, as qemu-img writes them.)
    const zeroAhead = mustZero && target.capabilities.fastZero && size > 0;
    if (zeroAhead) await zeroTarget(target, targetName, 0, size, true, fua);
    zeroInTarget = mustZero && !zeroAhead;
    const zeroBlock = Buffer.alloc(sparseSize);
    let firstJob = first;
    await runCopy(
      device,
      () => {
        const job = firstJob ?? next();
        firstJob = undefined;
        return job;
      },
      options.parallel,
      readBufferSize(chunkSize),
      async (job, { buffer, words }) => {
        const pieces = job.pieces;
        for (let index = 0; index < pieces.length; index += 3) {
          const at = pieces[index]!;
          const guestOffset = pieces[index + 1]!;
          const length = pieces[index + 2]!;
          await forEachDataRun(
            buffer,
            words,
            at,
            at + length,
            guestOffset,
            sparseSize,
            zeroBlock,
            (start, end) =>
              writeAll(
                target,
                buffer.subarray(start, end),
                guestOffset + start - at,
                targetName,
                fua,
                limiter,
              ),
            zeroInTarget
              ? (start, end) =>
                  zeroTarget(target, targetName, guestOffset + start - at, end - start, false, fua, limiter)
              : mustZero && limiter !== undefined
                ? (start, end) => limiter.take(end - start)
                : undefined,
          );
          done += length;
          report();
        }
      },
    );
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    await target.close().catch((error: unknown) => {
      if (failure === undefined) {
        throw new CliError(`error while closing '${targetName}': ${describeError(error)}`, { cause: error });
      }
    });
  }
}

/**
 * `-S 0` and `-C`: no zero scan. Zero ranges are allocated as zeros with `-S 0` (fallocate where
 * the file system can: the target fully allocated as qemu-img leaves it), and with `-C` left alone
 * (`'skip'`: a new file's holes) or zeroed (`'punch'`: `-n`, a hole punched where the file system
 * can); data ranges whose bytes lie in order in a plain file (a raw source, or a qcow2 image's
 * uncompressed clusters laid out in order) are copied file to file inside the kernel
 * (copy_file_range), the rest is read and written whole.
 *
 * Why only here: copying in the kernel saves one pass over the data in user space (512 MiB on
 * /dev/shm: 267 ms against 336 ms for pread + pwrite), but the default `-S 4k` must look at every
 * 4 KiB block for zeros, and reading the bytes to look, then copying them in the kernel, was
 * slower than writing what was read (441 ms). Scanning and writing from a read-only mmap of the
 * source (one copy, zero scan in place; tried in the fifth session) used less CPU only on a loaded
 * machine: on a quiet one a 1 GiB guest holding 512 MiB took 0.41-0.48 s mapped against 0.29-0.34
 * s read (qemu-img 0.29-0.32), since the page faults and the scan serialise with the writes that
 * the pool's reads overlap; it also doubled peak RSS and made a source truncated by a process
 * ignoring locks a SIGBUS. It was dropped.
 */
async function copyAllocated(
  device: BlockDevice,
  file: FileBlockDevice,
  targetName: string,
  options: ConvertToRawOptions,
  fua: boolean,
  zeros: 'allocate' | 'punch' | 'skip',
  onDone: (length: number) => void,
): Promise<void> {
  const chunkSize = wholeBlocks(options.chunkSize, SPARSE_BLOCK);
  const limiter = options.rateLimiter;
  const tasks = serialise(chunks(device, chunkSize));
  await runWorkers(options.parallel, chunkSize, async (buffer) => {
    const next = await tasks.next();
    if (next.done) return false;
    const { offset, length, zero, hostOffset, depth } = next.value;
    if (zero && zeros === 'skip') {
      onDone(length);
      return true;
    }
    if (limiter !== undefined) await limiter.take(length);
    const candidate = hostOffset === undefined ? undefined : options.hostFile?.(depth, offset);
    // Inside the file only (a short backing file's tail reads as zeros through the device).
    const hostFile =
      candidate !== undefined && hostOffset !== undefined && hostOffset + length <= candidate.size
        ? candidate
        : undefined;
    if (zero || hostFile === undefined || hostOffset === undefined) {
      let view: Buffer | undefined;
      if (!zero) {
        // A failing read is the source's error, worded by the device (as in the default path).
        view = buffer.subarray(0, length);
        await device.readInto(view, offset);
      }
      try {
        if (view === undefined) await file.writeZeroes(offset, length, { fua, mayUnmap: zeros === 'punch' });
        else await file.write(offset, view, { fua });
      } catch (error) {
        throw new CliError(
          `error while writing at byte ${offset} of '${targetName}': ${describeError(error)}`,
          { cause: error },
        );
      }
    } else {
      try {
        await hostFile.copyTo(file, hostOffset, offset, length);
        if (fua) await file.flush();
      } catch (error) {
        throw new CliError(
          `error while copying to byte ${offset} of '${targetName}': ${describeError(error)}`,
          { cause: error },
        );
      }
    }
    onDone(length);
    return true;
  });
}

/**
 * Writes every byte of `device` to `stream` in order, zeros included (target `-`). Reads run ahead
 * (runCopy, as for a file); each chunk is written once the one before it has been, and its buffer
 * is reused only once the stream has taken it. Zero ranges are written from one buffer of zeros,
 * never read.
 */
export async function convertToStream(
  device: BlockDevice,
  stream: Writable,
  options: Omit<ConvertToRawOptions, 'noCreate'>,
): Promise<void> {
  const size = device.size;
  let done = 0;
  const report = () => options.onProgress?.(done, size);
  report();
  const chunkSize = wholeBlocks(options.chunkSize, SPARSE_BLOCK);
  const zeros = Buffer.alloc(chunkSize);
  const tasks = chunks(device, chunkSize);
  const next = async (): Promise<ReadJob | undefined> => {
    const step = await tasks.next();
    if (step.done) return undefined;
    const { offset, length, zero } = step.value;
    return { hostFile: undefined, sourceOffset: offset, length, pieces: [0, offset, length], zero };
  };
  const streamFailed = new Promise<never>((_resolve, reject) => {
    stream.once('error', reject);
  });
  streamFailed.catch(() => undefined);
  const limiter = options.rateLimiter;
  await runCopy(device, next, options.parallel, chunkSize, async (job, { buffer }) => {
    const data = (job.zero === true ? zeros : buffer).subarray(0, job.length);
    if (limiter !== undefined) await limiter.take(data.length);
    await Promise.race([
      new Promise<void>((resolve, reject) => {
        stream.write(data, (error) => (error ? reject(error) : resolve()));
      }),
      streamFailed,
    ]);
    done += job.length;
    report();
  });
}

/** `chunkSize` rounded down to whole `block`s, at least one. */
function wholeBlocks(chunkSize: number, block: number): number {
  return Math.max(block, chunkSize - (chunkSize % block));
}

/**
 * Runs `parallel` workers, each with its own buffer of `bufferSize` bytes, calling `step` until
 * it returns false. On the first failure the other workers stop taking work; every worker has
 * finished before this settles, so nothing lands on a closed file.
 */
async function runWorkers(
  parallel: number,
  bufferSize: number,
  step: (buffer: Buffer) => Promise<boolean>,
): Promise<void> {
  let failed = false;
  const worker = async () => {
    // Its own ArrayBuffer (never the shared pool): offset 0, so 32-bit views line up.
    const buffer = Buffer.allocUnsafeSlow(bufferSize);
    try {
      while (!failed && (await step(buffer))) {}
    } catch (error) {
      failed = true;
      throw error;
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.max(1, parallel) }, worker));
  const failure = results.find((result) => result.status === 'rejected');
  if (failure !== undefined) throw failure.reason;
}

interface Chunk {
  readonly offset: number;
  readonly length: number;
  /** The range reads as zeros. */
  readonly zero: boolean;
  /** Where the chunk's bytes start in the answering layer's storage, when stored in order there
   * uncompressed (from the extent's `hostOffset`). */
  readonly hostOffset: number | undefined;
  /** The layer that answers (the extent's `depth`). */
  readonly depth: number;
}

/** Every range of `device`, zeros included, cut into chunks on `chunkSize` boundaries of the guest. */
async function* chunks(device: BlockDevice, chunkSize: number): AsyncGenerator<Chunk> {
  for await (const extent of walkExtents(device, 0, device.size)) {
    const end = extent.offset + extent.length;
    let offset = extent.offset;
    while (offset < end) {
      const chunkEnd = Math.min(end, offset - (offset % chunkSize) + chunkSize);
      const hostOffset =
        extent.hostOffset === undefined || extent.compressed === true || !extent.data
          ? undefined
          : extent.hostOffset + (offset - extent.offset);
      yield { offset, length: chunkEnd - offset, zero: extent.zero, hostOffset, depth: extent.depth };
      offset = chunkEnd;
    }
  }
}

/** An async iterator safe to share between workers: calls to next() run one at a time. */
function serialise<T>(generator: AsyncGenerator<T>): { next(): Promise<IteratorResult<T>> } {
  let last: Promise<unknown> = Promise.resolve();
  return {
    next() {
      const result = last.then(() => generator.next());
      last = result.catch(() => undefined);
      return result;
    },
  };
}

/**
 * Makes `[offset, offset + length)` of the target read as zeros. `whole`: one call over the range
 * (a punched hole); otherwise only the target's data extents inside it are zeroed, so a range
 * that is a hole already costs nothing.
 */
async function zeroTarget(
  file: FileBlockDevice,
  targetName: string,
  offset: number,
  length: number,
  whole: boolean,
  fua: boolean,
  limiter?: RateLimiter,
): Promise<void> {
  if (limiter !== undefined) await limiter.take(length);
  try {
    if (whole) {
      await file.writeZeroes(offset, length, { mayUnmap: true, fua });
      return;
    }
    for await (const extent of walkExtents(file, offset, offset + length)) {
      if (!extent.zero) await file.writeZeroes(extent.offset, extent.length, { mayUnmap: true, fua });
    }
  } catch (error) {
    throw new CliError(
      `error while writing zeros at byte ${offset} of '${targetName}': ${describeError(error)}`,
      { cause: error },
    );
  }
}

async function writeAll(
  file: FileBlockDevice,
  data: Buffer,
  position: number,
  targetName: string,
  fua: boolean,
  limiter: RateLimiter | undefined,
): Promise<void> {
  if (limiter !== undefined) await limiter.take(data.length);
  try {
    await file.write(position, data, fua ? { fua } : undefined);
  } catch (error) {
    throw new CliError(
      `error while writing at byte ${position} of '${targetName}': ${describeError(error)}`,
      {
        cause: error,
      },
    );
  }
}
