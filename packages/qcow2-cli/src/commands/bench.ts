/**
 * `qcow2 bench`: qemu-img bench's request stream and output lines. `count` requests of `bufferSize`
 * bytes, `depth` in flight, the first at `offset` and each next one `step` bytes further (wrapping
 * at the device's end); writes fill the buffer with `pattern` and may flush every
 * `flushInterval` requests, draining the queue first unless `noDrain`.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import { type ImageFormat, openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';
import { openWritable } from './writable-image.js';

export interface BenchOptions {
  readonly format?: ImageFormat | undefined;
  readonly count: number;
  readonly depth: number;
  readonly bufferSize: number;
  /** 0: the buffer size. */
  readonly step: number;
  readonly offset: number;
  readonly write: boolean;
  readonly pattern: number;
  readonly flushInterval: number;
  readonly drain: boolean;
  /** `-t`: accepted for compatibility; the page cache is always used. */
  readonly cache?: string | undefined;
  /** `-i` / `-n`: accepted for compatibility (`native` needs `-t none` or `directsync`, as in QEMU). */
  readonly aio?: string | undefined;
  readonly quiet: boolean;
  readonly progress: boolean;
  readonly forceShare: boolean;
}

export const CACHE_MODES = ['none', 'off', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export const AIO_MODES = ['threads', 'native', 'io_uring'] as const;

/** The checks qemu-img makes on bench's options, with its messages. */
export function validateBenchOptions(options: BenchOptions): void {
  if (options.cache !== undefined && !(CACHE_MODES as readonly string[]).includes(options.cache)) {
    throw new UsageError('Invalid cache mode');
  }
  if (options.aio !== undefined && !(AIO_MODES as readonly string[]).includes(options.aio)) {
    throw new UsageError(`Invalid aio option: ${options.aio}`);
  }
  if (options.flushInterval > 0 && !options.write) {
    throw new UsageError('--flush-interval is only available in write tests');
  }
  if (options.flushInterval > 0 && options.flushInterval < options.depth) {
    throw new UsageError("Flush interval can't be smaller than depth");
  }
  if (!options.drain && options.flushInterval === 0) {
    throw new UsageError('--no-drain is only meaningful with --flush-interval');
  }
}

interface BenchTarget {
  readonly device: BlockDevice;
  close(): Promise<void>;
}

async function openForBench(
  context: CommandContext,
  file: string,
  options: BenchOptions,
): Promise<BenchTarget> {
  const path = resolveAgainst(context.io.cwd, file);
  if (
    options.aio === 'native' &&
    options.cache !== 'none' &&
    options.cache !== 'off' &&
    options.cache !== 'directsync'
  ) {
    throw new CliError(
      `Could not open '${file}': aio=native was specified, but it requires cache.direct=on, which was not specified.`,
    );
  }
  if (!options.write) {
    // Requests up to 64 KiB inline on a memory-backed file (as writes, see writable-image.ts).
    const opened = await openImage(path, {
      displayName: file,
      format: options.format,
      forceShare: options.forceShare,
      syncIoMaxBytes: 'memory-backed',
    });
    return { device: opened.device, close: () => opened.close() };
  }
  // Writes: the image file read-write, its backing chain read-only.
  return openWritable(path, file, { format: options.format });
}

export async function benchCommand(
  context: CommandContext,
  file: string,
  options: BenchOptions,
): Promise<number> {
  validateBenchOptions(options);
  const target = await openForBench(context, file, options);
  const device = target.device;
  const step = options.step === 0 ? options.bufferSize : options.step;
  // qemu-img bench prints its lines even with -q; -q only silences our -p progress.
  const say = (line: string) => {
    context.io.stdout.write(`${line}\n`);
  };
  try {
    say(
      `Sending ${options.count} ${options.write ? 'write' : 'read'} requests, ${options.bufferSize} bytes each, ` +
        `${options.depth} in parallel (starting at offset ${options.offset}, step size ${step})`,
    );
    if (options.flushInterval > 0) say(`Sending flush every ${options.flushInterval} requests`);
    const progress = progressReporter(context.io, options.progress && !options.quiet);
    const started = performance.now();
    await runRequests(device, { ...options, step }, (done) => progress?.update(done, options.count));
    progress?.finish();
    const seconds = (performance.now() - started) / 1000;
    say(`Run completed in ${seconds.toFixed(3)} seconds.`);
  } catch (error) {
    if (error instanceof CliError) throw error;
    throw new CliError(`Failed request: ${describeError(error)}`, { cause: error });
  } finally {
    await target.close();
  }
  return 0;
}

/** Issues the requests, `depth` at a time, as qemu-img bench orders them. */
export async function runRequests(
  device: BlockDevice,
  options: Pick<
    BenchOptions,
    'count' | 'depth' | 'bufferSize' | 'step' | 'offset' | 'write' | 'pattern' | 'flushInterval' | 'drain'
  >,
  onDone?: (done: number) => void,
): Promise<void> {
  const lanes = Math.max(1, Math.min(options.depth, options.count));
  let nextOffset = options.offset;
  let issued = 0;
  let completed = 0;
  let flushing: Promise<void> | undefined;
  const takeOffset = () => {
    const offset = nextOffset;
    nextOffset += options.step;
    nextOffset = device.size === 0 ? 0 : nextOffset % device.size;
    return offset;
  };
  const lane = async (buffer: Uint8Array) => {
    while (issued < options.count) {
      if (flushing !== undefined) await flushing;
      if (issued >= options.count) return;
      issued++;
      const offset = takeOffset();
      if (options.write) await device.write(offset, buffer);
      else await device.readInto(buffer, offset);
      completed++;
      onDone?.(completed);
      const remaining = options.count - completed;
      if (options.flushInterval > 0 && remaining % options.flushInterval === 0 && flushing === undefined) {
        if (options.drain) {
          flushing = (async () => {
            while (issued > completed) await new Promise((resolve) => setImmediate(resolve));
            await device.flush();
          })().finally(() => {
            flushing = undefined;
          });
          await flushing;
        } else {
          await device.flush();
        }
      }
    }
  };
  // A request past the end fails as qemu-img's does (its block layer answers EIO), before any
  // buffer is made: `-s 1G` over a small image must not allocate gigabytes first.
  if (options.count > 0 && options.offset + options.bufferSize > device.size) {
    throw new CliError('Failed request: Input/output error', { code: 'EIO' });
  }
  // At most BUFFER_BYTES of buffers (one at least): lanes share them when requests are large. A
  // buffer is only a source of the pattern (writes) or a place for data nobody looks at (reads).
  const bufferCount = Math.max(
    1,
    Math.min(lanes, Math.floor(BUFFER_BYTES / Math.max(1, options.bufferSize))),
  );
  const buffers = Array.from({ length: bufferCount }, () => {
    const buffer = new Uint8Array(options.bufferSize);
    return options.write ? buffer.fill(options.pattern) : buffer;
  });
  await Promise.all(Array.from({ length: lanes }, (_, index) => lane(buffers[index % bufferCount]!)));
}

/** Most bytes of request buffers `runRequests` allocates when requests are larger than this / depth. */
const BUFFER_BYTES = 256 * 1024 * 1024;
