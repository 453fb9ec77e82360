/**
 * `qcow2 dd`: qemu-img dd's operands (`if=`, `of=`, `bs=`, `count=`, `skip=`), sizes and quirks.
 * As in qemu-img, `count` bounds the *end* of the input read (`count * bs`), not the number of
 * blocks copied after `skip`; a `skip` past the end creates an empty output, says so and exits 0. The
 * output (`-O raw`, the default, or `-O qcow2`: a new image with qemu-img create's defaults) is
 * created anew, its size rounded up to 512 bytes; ranges of the input that read as zeros stay
 * holes in a raw output and unallocated clusters in a qcow2 one.
 */

import { resolve } from 'node:path';
import type { BlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { createImage } from '@qcowkit/qcow2-core/node';
import { type ImageFormat, openImage } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import { walkExtents } from '../extents.js';
import type { CommandContext } from '../io.js';
import { resolveAgainst } from '../paths.js';
import { parseSize } from '../size.js';

export interface DdOperands {
  readonly input: string;
  readonly output: string;
  readonly blockSize: number;
  readonly count?: number | undefined;
  readonly skip?: number | undefined;
}

export interface DdOptions {
  readonly format?: ImageFormat | undefined;
  readonly outputFormat: string;
  readonly forceShare: boolean;
}

const MAX_BLOCK_SIZE = 2147483647;
/** Formats qemu-img knows but this tool does not write: refused as unsupported, not unknown. */
const KNOWN_QEMU_FORMATS: readonly string[] = [
  'vmdk',
  'vdi',
  'vhdx',
  'vpc',
  'qed',
  'luks',
  'parallels',
  'qcow',
  'dmg',
];
const COPY_CHUNK = 2 * 2 ** 20;

function parseCount(value: string, what: string): number {
  try {
    return parseSize(value, what);
  } catch {
    throw new UsageError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    );
  }
}

/** Parses dd's `key=value` operands as qemu-img does. */
export function parseDdOperands(operands: readonly string[]): DdOperands {
  let input: string | undefined;
  let output: string | undefined;
  let blockSize = 512;
  let count: number | undefined;
  let skip: number | undefined;
  for (const operand of operands) {
    const equals = operand.indexOf('=');
    const key = equals < 0 ? operand : operand.slice(0, equals);
    const value = equals < 0 ? '' : operand.slice(equals + 1);
    switch (equals < 0 ? '' : key) {
      case 'if':
        input = value;
        break;
      case 'of':
        output = value;
        break;
      case 'bs': {
        let size: number;
        try {
          size = parseSize(value, 'bs');
        } catch {
          size = 0;
        }
        if (size < 1 || size > MAX_BLOCK_SIZE) {
          throw new UsageError(`Invalid bs specified. Must be between 1 and ${MAX_BLOCK_SIZE}.`);
        }
        blockSize = size;
        break;
      }
      case 'count':
        count = parseCount(value, 'count');
        break;
      case 'skip':
        skip = parseCount(value, 'skip');
        break;
      default:
        throw new UsageError(`unrecognized operand ${key}`);
    }
  }
  if (input === undefined || output === undefined || input === '' || output === '') {
    throw new UsageError('Must specify both input and output files');
  }
  return { input, output, blockSize, count, skip };
}

export async function ddCommand(
  context: CommandContext,
  operands: DdOperands,
  options: DdOptions,
): Promise<number> {
  const outputFormat = options.outputFormat;
  if (outputFormat !== 'raw' && outputFormat !== 'qcow2') {
    if (KNOWN_QEMU_FORMATS.includes(outputFormat)) {
      throw new CliError(`dd: writing ${outputFormat} images is not supported (raw or qcow2)`, {
        code: 'EUNSUPPORTED',
      });
    }
    throw new UsageError('Unknown file format');
  }
  const inputPath = resolveAgainst(context.io.cwd, operands.input);
  const outputPath = resolveAgainst(context.io.cwd, operands.output);
  const opened = await openImage(inputPath, {
    displayName: operands.input,
    format: options.format,
    forceShare: options.forceShare,
  });
  try {
    if (opened.chain.some((layer) => resolve(layer.path) === resolve(outputPath))) {
      throw new CliError(`Could not create '${operands.output}': it is the input or a file the input reads`, {
        code: 'EINVAL',
      });
    }
    const { blockSize } = operands;
    let end = opened.device.size;
    if (operands.count !== undefined && operands.count * blockSize < end) end = operands.count * blockSize;
    const skipBytes = (operands.skip ?? 0) * blockSize;
    const skipPastEnd = operands.skip !== undefined && (!Number.isSafeInteger(skipBytes) || skipBytes > end);
    const start = skipPastEnd ? end : skipBytes;
    let target: { device: BlockDevice; close(): Promise<void> };
    try {
      // The output is created as qemu-img creates images: its size rounded up to 512 bytes.
      const size = Math.ceil((end - start) / 512) * 512;
      if (outputFormat === 'qcow2') {
        const image = await createImage(outputPath, { size, overwrite: true });
        target = { device: image.device, close: () => image.close() };
      } else {
        const file = await FileBlockDevice.create(outputPath, size, { overwrite: true });
        target = { device: file, close: () => file.close() };
      }
    } catch (error) {
      throw new CliError(`Could not create '${operands.output}': ${describeError(error)}`, { cause: error });
    }
    try {
      // qemu-img reports it and still succeeds, leaving the empty output (as dd(1) does).
      if (skipPastEnd) context.io.stderr.write(`qcow2: ${operands.input}: cannot skip to specified offset\n`);
      for await (const extent of walkExtents(opened.device, start, end)) {
        if (extent.zero) continue;
        for (let at = extent.offset; at < extent.offset + extent.length; at += COPY_CHUNK) {
          const length = Math.min(COPY_CHUNK, extent.offset + extent.length - at);
          const bytes = await opened.device.read(at, length);
          await target.device.write(at - start, bytes);
        }
      }
    } finally {
      await target.close();
    }
  } finally {
    await opened.close();
  }
  return 0;
}
