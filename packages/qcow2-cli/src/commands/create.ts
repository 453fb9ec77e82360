/**
 * `qcow2 create`: qemu-img create's flags, `-o` options, size rules and "Formatting ..." line.
 * qcow2 images are laid out by qcow2-core (`planQcow2Create` / `writeQcow2Layout`, or
 * `Qcow2Image.create` for metadata preallocation and external data files; `preallocateData` on the
 * empty layout for falloc and full);
 * raw images are sparse files, or fallocated (falloc) or written with zeros (full).
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice, SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';
import {
  planQcow2Create,
  preallocateData,
  type Qcow2CreateOptions,
  writeQcow2Layout,
} from '@qcowkit/qcow2-core';
import type { ImageFormat } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { parseSize } from '../size.js';
import { optionItems } from './option-help.js';

export interface CreateCommandOptions {
  readonly format: string;
  /** `-o a=b,c=d` (each `-o` given, in order). */
  readonly options: readonly string[];
  readonly backingFile?: string | undefined;
  readonly backingFormat?: string | undefined;
  /** `-u`: do not open the backing file (the size must then be given). */
  readonly unsafe: boolean;
  readonly quiet: boolean;
}

const QCOW2_KEYS = [
  'size',
  'compat',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'encryption',
  'cluster_size',
  'preallocation',
  'lazy_refcounts',
  'refcount_bits',
  'extended_l2',
  'compression_type',
] as const;
const RAW_KEYS = ['size', 'preallocation'] as const;
const RAW_PREALLOCATION: readonly string[] = ['off', 'metadata', 'falloc', 'full'];
/** Bytes of zeros written at a time by preallocation=full (create and resize). */
const ZERO_CHUNK = 4 * 1024 * 1024;

/** A raw file's data area: allocated in place (falloc) or written with zeros (full). */
export async function preallocateRaw(device: FileBlockDevice, mode: 'falloc' | 'full'): Promise<void> {
  if (device.size === 0) return;
  if (mode === 'falloc') await device.writeZeroes(0, device.size);
  else await writeZeros(device, 0, device.size);
  await device.flush();
}

/** Writes zeros (as data, not a zero request) over `[start, end)` of `device`. */
export async function writeZeros(device: BlockDevice, start: number, end: number): Promise<void> {
  const zeros = new Uint8Array(Math.min(ZERO_CHUNK, end - start));
  for (let at = start; at < end; at += zeros.length) {
    await device.write(at, zeros.subarray(0, Math.min(zeros.length, end - at)));
  }
}

/** Splits `-o` strings into key/value pairs (`,,` is a literal comma, as in QEMU). */
export function parseCreateOptions(
  file: string,
  format: string,
  list: readonly string[],
  prefix = `${file}: `,
): Map<string, string> {
  const allowed: readonly string[] = format === 'raw' ? RAW_KEYS : QCOW2_KEYS;
  const out = new Map<string, string>();
  for (const { key, value } of optionItems(list)) {
    if (!allowed.includes(key)) throw new UsageError(`${prefix}Invalid parameter '${key}'`);
    out.set(key, value);
  }
  return out;
}

function onOff(file: string, key: string, value: string | undefined): boolean | undefined {
  if (value === undefined) return undefined;
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new UsageError(`${file}: Parameter '${key}' expects 'on' or 'off'`);
}

function imageSize(text: string): number {
  try {
    return parseSize(text, 'image size');
  } catch {
    throw new UsageError(
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
}

/**
 * Whether `createCommand` opens a backing file or lays the image out through `Qcow2Image`
 * (metadata preallocation, an external data file) for this command line: the image engine those
 * need is imported when used, so that a plain create loads without it (the bin runs plain lines
 * from a bundle of create alone: bin/qcow2-create.ts). Throws what `createCommand` would for
 * unknown `-o` keys.
 */
export function createNeedsImageEngine(file: string, options: CreateCommandOptions): boolean {
  const values = parseCreateOptions(file, options.format, options.options);
  if ((options.backingFile ?? values.get('backing_file')) !== undefined && !options.unsafe) return true;
  return (
    options.format === 'qcow2' && (values.get('preallocation') === 'metadata' || values.has('data_file'))
  );
}

export async function createCommand(
  context: CommandContext,
  file: string,
  sizeText: string | undefined,
  options: CreateCommandOptions,
): Promise<number> {
  const { format } = options;
  if (format !== 'qcow2' && format !== 'raw') {
    throw new UsageError(`${file}: Unknown file format '${format}'`);
  }
  const values = parseCreateOptions(file, format, options.options);
  if (options.backingFile !== undefined) values.set('backing_file', options.backingFile);
  if (options.backingFormat !== undefined) values.set('backing_fmt', options.backingFormat);
  if (values.has('backing_fmt') && !values.has('backing_file')) {
    throw new UsageError(`${file}: backing_fmt requires a backing file (-b)`);
  }
  if (format === 'raw' && values.has('backing_file')) {
    throw new UsageError(`${file}: Backing file not supported for file format 'raw'`);
  }
  if (sizeText !== undefined && values.has('size')) {
    throw new UsageError(`${file}: The image size must be specified only once`);
  }
  let size = sizeText !== undefined ? imageSize(sizeText) : undefined;
  if (size === undefined && values.has('size')) size = imageSize(values.get('size')!);
  const path = resolveAgainst(context.io.cwd, file);
  const backingFile = values.get('backing_file');
  if (backingFile !== undefined && values.get('backing_fmt') === undefined && !options.unsafe) {
    throw new UsageError(`${file}: a backing format is needed with a backing file (-F qcow2|raw|qcow)`);
  }
  if (backingFile !== undefined && !options.unsafe) {
    // As qemu-img: the backing file must open, and gives the size when none is given.
    const backingPath = pathCombine(path, backingFile);
    const { openImage } = await import('../engine.js');
    const backing = await openImage(backingPath, {
      displayName: backingFile,
      format: values.get('backing_fmt') as ImageFormat | undefined,
      forceShare: true,
    }).catch((error: unknown) => {
      throw new CliError(`${file}: Could not open backing file: ${describeError(error)}`, { cause: error });
    });
    size ??= backing.device.size;
    await backing.close();
  }
  if (size === undefined) throw new UsageError(`${file}: Image creation needs a size parameter`);
  size = Math.ceil(size / 512) * 512;
  const preallocation = values.get('preallocation');

  if (format === 'raw') {
    if (!options.quiet) {
      context.io.stdout.write(
        `Formatting '${file}', fmt=raw size=${size}${preallocation === undefined ? '' : ` preallocation=${preallocation}`}\n`,
      );
    }
    // qemu-img's messages, after its Formatting line.
    if (preallocation !== undefined && !RAW_PREALLOCATION.includes(preallocation)) {
      throw new UsageError(`${file}: invalid parameter value: ${preallocation}`);
    }
    if (preallocation === 'metadata') {
      throw new CliError(`${file}: Unsupported preallocation mode: metadata`, { code: 'EUNSUPPORTED' });
    }
    const device = await FileBlockDevice.create(path, size, { overwrite: true }).catch((error: unknown) => {
      throw new CliError(`${file}: Could not create '${file}': ${describeError(error)}`, { cause: error });
    });
    try {
      if (preallocation === 'falloc' || preallocation === 'full') {
        await preallocateRaw(device, preallocation);
      }
      // As qemu-img: the first block is written, so the file system has allocated it.
      if (size > 0 && preallocation !== 'full') await device.write(0, new Uint8Array(Math.min(4096, size)));
    } catch (error) {
      throw new CliError(`${file}: Could not preallocate data for the new file: ${describeError(error)}`, {
        cause: error,
      });
    } finally {
      await device.close();
    }
    return 0;
  }

  if (preallocation !== undefined && !RAW_PREALLOCATION.includes(preallocation)) {
    // qemu-img prints its Formatting line before it refuses the mode.
    const others = new Map(values);
    others.delete('preallocation');
    if (!options.quiet) {
      context.io.stdout.write(
        `${formattingLine(file, size, values, qcow2CreateOptions(file, size, others))}\n`,
      );
    }
    throw new UsageError(`${file}: Parameter 'preallocation' does not accept value '${preallocation}'`);
  }
  const createOptions = qcow2CreateOptions(file, size, values);
  planQcow2Create(createOptions); // validates before anything is written
  if (!options.quiet) context.io.stdout.write(`${formattingLine(file, size, values, createOptions)}\n`);
  if (
    createOptions.backingFile !== undefined &&
    createOptions.preallocation === 'metadata' &&
    createOptions.extendedL2 !== true
  ) {
    // As qemu-img: preallocated clusters would hide the backing file's data.
    throw new CliError(
      `${file}: Backing file and preallocation can only be used at the same time if extended_l2 is on`,
    );
  }
  // Metadata writes are small and one at a time: written from this thread, each saves a round trip
  // through libuv's thread pool.
  const device = await FileBlockDevice.create(path, 0, {
    overwrite: true,
    syncIoMaxBytes: SYNC_IO_MAX_BYTES,
  }).catch((error: unknown) => {
    throw new CliError(`${file}: Could not create '${file}': ${describeError(error)}`, { cause: error });
  });
  try {
    if (createOptions.dataFile !== undefined) {
      const dataPath = resolveAgainst(context.io.cwd, createOptions.dataFile);
      await createWithDataFile(device, dataPath, createOptions, preallocation);
    } else if (preallocation === 'metadata') {
      // The backing file is not needed to lay out metadata (qemu-img does not open it either).
      const { Qcow2Image } = await import('@qcowkit/qcow2-core');
      const image = await Qcow2Image.create(device, { ...createOptions, openBacking: false });
      await image.close();
    } else {
      await writeQcow2Layout(device, planQcow2Create({ ...createOptions, preallocation: 'off' }));
      // falloc and full: the data area after the refcount structures, L2 tables last, as QEMU.
      if (preallocation === 'falloc' || preallocation === 'full')
        await preallocateData(device, preallocation);
    }
  } catch (error) {
    throw new CliError(`${file}: ${describeError(error)}`, { cause: error });
  } finally {
    await device.close();
  }
  return 0;
}

/**
 * A qcow2 image with an external data file, as qemu-img creates it: the data file made (an existing
 * one emptied) at the guest size; preallocation falloc or full allocates the data file's storage
 * (full writes zeros) and, with metadata, maps every cluster to its guest offset, as does a raw
 * data file (data_file_raw=on) in every mode.
 */
async function createWithDataFile(
  device: FileBlockDevice,
  dataPath: string,
  options: Qcow2CreateOptions,
  preallocation: string | undefined,
): Promise<void> {
  const plan = planQcow2Create(options);
  const dataFile = await FileBlockDevice.create(dataPath, plan.size, { overwrite: true });
  try {
    if (preallocation === 'falloc' || preallocation === 'full') await preallocateRaw(dataFile, preallocation);
    const { Qcow2Image } = await import('@qcowkit/qcow2-core');
    const image = await Qcow2Image.create(device, {
      ...options,
      preallocation: preallocation === undefined || preallocation === 'off' ? 'off' : 'metadata',
      openBacking: false,
      resolveDataFile: async () => dataFile,
    });
    await image.close();
  } finally {
    await dataFile.close();
  }
}

export function qcow2CreateOptions(
  file: string,
  size: number,
  values: Map<string, string>,
): Qcow2CreateOptions {
  const out: Qcow2CreateOptions = { size };
  const clusterSize = values.get('cluster_size');
  if (clusterSize !== undefined) out.clusterSize = parseSize(clusterSize, 'cluster size');
  const refcountBits = values.get('refcount_bits');
  if (refcountBits !== undefined) out.refcountBits = Number.parseInt(refcountBits, 10);
  const extendedL2 = onOff(file, 'extended_l2', values.get('extended_l2'));
  if (extendedL2 !== undefined) out.extendedL2 = extendedL2;
  const compat = values.get('compat');
  if (compat !== undefined) {
    const normalized = compat === 'v2' ? '0.10' : compat === 'v3' ? '1.1' : compat;
    if (normalized !== '0.10' && normalized !== '1.1') {
      throw new UsageError(`${file}: Invalid parameter value for 'compat': '${compat}'`);
    }
    out.compat = normalized;
  }
  const lazy = onOff(file, 'lazy_refcounts', values.get('lazy_refcounts'));
  if (lazy !== undefined) out.lazyRefcounts = lazy;
  const compression = values.get('compression_type');
  if (compression !== undefined) {
    if (compression !== 'zlib' && compression !== 'zstd') {
      throw new UsageError(`${file}: Invalid parameter value for 'compression_type': '${compression}'`);
    }
    out.compressionType = compression;
  }
  const preallocation = values.get('preallocation');
  if (preallocation !== undefined) {
    if (!RAW_PREALLOCATION.includes(preallocation)) {
      throw new UsageError(`${file}: Parameter 'preallocation' does not accept value '${preallocation}'`);
    }
    // falloc and full are metadata preallocation plus the data area (measure and convert count
    // them so); create lays them out as an empty image then preallocateData.
    out.preallocation = preallocation === 'off' ? 'off' : 'metadata';
  }
  const backingFile = values.get('backing_file');
  if (backingFile !== undefined) out.backingFile = backingFile;
  const backingFormat = values.get('backing_fmt');
  if (backingFormat !== undefined) out.backingFormat = backingFormat;
  const dataFile = values.get('data_file');
  if (dataFile !== undefined) out.dataFile = dataFile;
  const dataFileRaw = onOff(file, 'data_file_raw', values.get('data_file_raw'));
  if (dataFileRaw !== undefined) out.dataFileRaw = dataFileRaw;
  if (values.has('encryption')) {
    throw new CliError(`${file}: encryption is not supported`, { code: 'EUNSUPPORTED' });
  }
  return out;
}

/** qemu-img's line: its options in its order, the ones it always shows and those given. */
function formattingLine(
  file: string,
  size: number,
  values: Map<string, string>,
  options: Qcow2CreateOptions,
): string {
  const parts = [`Formatting '${file}', fmt=qcow2`, `cluster_size=${options.clusterSize ?? 65536}`];
  parts.push(`extended_l2=${options.extendedL2 === true ? 'on' : 'off'}`);
  if (values.has('preallocation')) parts.push(`preallocation=${values.get('preallocation')}`);
  parts.push(`compression_type=${options.compressionType ?? 'zlib'}`, `size=${size}`);
  if (values.has('compat')) parts.push(`compat=${values.get('compat')}`);
  if (options.backingFile !== undefined) parts.push(`backing_file=${options.backingFile}`);
  if (options.backingFormat !== undefined) parts.push(`backing_fmt=${options.backingFormat}`);
  if (options.dataFile !== undefined) parts.push(`data_file=${options.dataFile}`);
  if (values.has('data_file_raw')) parts.push(`data_file_raw=${options.dataFileRaw === true ? 'on' : 'off'}`);
  parts.push(`lazy_refcounts=${options.lazyRefcounts === true ? 'on' : 'off'}`);
  parts.push(`refcount_bits=${options.refcountBits ?? 16}`);
  return parts.join(' ');
}
