/**
 * `qcow2 convert`'s command line without commander: the common spellings (`-f FMT -O FMT -l X -s X
 * -S SIZE -n -p -q -U --force-share --debug` and two file names, each flag and value its own argument; the
 * target may be `-`, stdout) are
 * parsed here so the command starts without loading commander. Anything else (bundled flags,
 * `--help`, unknown or misspelt options, a missing value or file name, an unknown format, any
 * output format but raw) returns undefined and goes to commander, which reports it or runs the
 * other converter: the fast path never words an error itself.
 */

import { UsageError } from '../errors.js';
import { IMAGE_FORMATS, type ImageFormat } from '../image-formats.js';
import { parseSize } from '../size.js';
import type { ConvertOptions } from './convert.js';

/** The largest `-S` qemu-img takes (a multiple of 512 bytes up to 16 MiB; 0: no zero scan). */
export const MAX_SPARSE_SIZE = 16 * 2 ** 20;

export interface ConvertCommandLine {
  readonly source: string;
  readonly target: string;
  readonly options: ConvertOptions;
}

const WITH_VALUE = new Set(['-f', '-O', '-l', '-s', '-S']);
const FLAGS = new Set(['-n', '-p', '-q', '-U', '--force-share', '--debug']);

/** `args` are the arguments after `convert`; undefined when commander has to look at them. */
export function convertFastPath(args: readonly string[]): ConvertCommandLine | undefined {
  const values = new Map<string, string>();
  const flags = new Set<string>();
  const files: string[] = [];
  for (let index = 0; index < args.length; index++) {
    const arg = args[index]!;
    if (WITH_VALUE.has(arg)) {
      const value = args[index + 1];
      if (value === undefined || value.startsWith('-')) return undefined;
      values.set(arg, value);
      index++;
    } else if (FLAGS.has(arg)) {
      flags.add(arg);
    } else if (arg.startsWith('-') && arg !== '-') {
      return undefined;
    } else {
      files.push(arg);
    }
  }
  if (files.length !== 2) return undefined;
  const format = values.get('-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  let sparseSize: number | undefined;
  const sparse = values.get('-S');
  if (sparse !== undefined) {
    try {
      sparseSize = parseSparseSize(sparse);
    } catch {
      return undefined; // commander words the error
    }
  }
  // Only raw output is this path's: -O qcow2 (and anything commander rejects) goes to commander.
  if ((values.get('-O') ?? 'raw') !== 'raw') return undefined;
  return {
    source: files[0]!,
    target: files[1]!,
    options: {
      format: format as ImageFormat | undefined,
      outputFormat: 'raw',
      snapshot: parseSnapshotOption(values.get('-l'), values.get('-s')),
      progress: flags.has('-p') && !flags.has('-q'),
      forceShare: flags.has('-U') || flags.has('--force-share'),
      noCreate: flags.has('-n'),
      ...(sparseSize === undefined ? {} : { sparseSize }),
    },
  };
}

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
