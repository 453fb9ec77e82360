/**
 * Plain `qcow2 convert -O qcow2` command lines read without commander, for convert's own bundle
 * (bin/qcow2-convert.ts); `-O raw` lines are commands/fast-paths.ts's `convertFastPath`.
 *
 * The rules (and the splitting, `parse`) are the fast paths': only the plain spellings are read (each flag and its value their
 * own arguments, `--long=value` too, `-` an operand); a bundled or attached flag, an option this
 * does not know (`--help`, `-W5`, ...), a value that looks like an option, a wrong number of
 * operands, or a value commander's parsers or convert's action would refuse returns undefined, and
 * the whole CLI (commander) takes the line and words the error. What it returns is what
 * commander's convert action hands `convertToQcow2Command` (test/convert-qcow2-line.test.ts runs
 * every accepted line both ways).
 */

import type { ConvertOptions } from '../commands/convert.js';
import { parseSnapshotOption, parseSparseSize } from '../commands/convert-args.js';
import type { Qcow2ConvertExtras } from '../commands/convert-qcow2.js';
import { last as lastValue, parse } from '../commands/fast-paths.js';
import { asksOptionHelp } from '../commands/option-help.js';
import { isCacheMode } from '../commands/register-ops.js';
import { IMAGE_FORMATS, type ImageFormat } from '../image-formats.js';

const WITH_VALUE: ReadonlySet<string> = new Set([
  '-f',
  '-O',
  '-l',
  '-s',
  '-o',
  '-B',
  '-F',
  '-m',
  '-S',
  '-t',
  '-T',
]);
const FLAGS: ReadonlySet<string> = new Set([
  '-U',
  '--force-share',
  '--debug',
  '-p',
  '-q',
  '-c',
  '-W',
  '-n',
  '--target-is-zero',
  '--bitmaps',
  '--skip-broken-bitmaps',
]);

export interface ConvertQcow2Line {
  readonly source: string;
  /** `-`: stdout. */
  readonly target: string;
  readonly options: ConvertOptions & Qcow2ConvertExtras;
}

/**
 * `args` are the arguments after `convert`; undefined unless the line asks for `-O qcow2` in the
 * plain spellings. Throws only what convert's action throws itself (`-l` with `-s`).
 */
export function convertQcow2Line(args: readonly string[]): ConvertQcow2Line | undefined {
  const parsed = parse(args, WITH_VALUE, FLAGS);
  if (parsed === undefined) return undefined;
  const { values, flags, operands } = parsed;
  const last = (name: string): string | undefined => lastValue(parsed, name);
  if (operands.length !== 2 || last('-O') !== 'qcow2') return undefined;
  const format = last('-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  // The action's own refusals, and values commander's parsers refuse: commander words them.
  if (flags.has('--target-is-zero') && !flags.has('-n')) return undefined;
  if (flags.has('--skip-broken-bitmaps') && !flags.has('--bitmaps')) return undefined;
  if (asksOptionHelp(values.get('-o'))) return undefined;
  // -t and -T when they name a cache mode (-T changes nothing).
  const cache = last('-t');
  if (cache !== undefined && !isCacheMode(cache)) return undefined;
  const sourceCache = last('-T');
  if (sourceCache !== undefined && !isCacheMode(sourceCache)) return undefined;
  const parallelText = last('-m');
  const parallel = parallelText === undefined ? undefined : Number(parallelText);
  if (parallel !== undefined && (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > 16))
    return undefined;
  const sparse = last('-S');
  let sparseSize: number | undefined;
  try {
    if (sparse !== undefined) sparseSize = parseSparseSize(sparse);
  } catch {
    return undefined;
  }
  return {
    source: operands[0]!,
    target: operands[1]!,
    options: {
      format: format as ImageFormat | undefined,
      snapshot: parseSnapshotOption(last('-l'), last('-s')),
      progress: flags.has('-p') && !flags.has('-q'),
      quiet: flags.has('-q'),
      forceShare: flags.has('-U') || flags.has('--force-share'),
      noCreate: flags.has('-n'),
      ...(sparseSize === undefined ? {} : { sparseSize }),
      targetIsZero: flags.has('--target-is-zero'),
      ...(cache === undefined ? {} : { cache }),
      outputFormat: 'qcow2',
      createOptions: values.get('-o') ?? [],
      compress: flags.has('-c'),
      backingFile: last('-B'),
      backingFormat: last('-F'),
      parallel,
      bitmaps: flags.has('--bitmaps'),
      skipBrokenBitmaps: flags.has('--skip-broken-bitmaps'),
    },
  };
}
