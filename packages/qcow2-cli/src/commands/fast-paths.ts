/**
 * `qcow2 convert` (-O raw), `create`, `info`, `check`, `map` and `snapshot` command lines without
 * commander: loading commander, building every subcommand's definition and parsing is ~2-3 ms of
 * every start (for `create`, a good part of the command).
 * Only the plain spellings are parsed here (each flag and its value their own arguments,
 * `--output=FMT` too; `-` is an operand, as for commander); anything else (bundled or attached
 * flags, `--help`, an unknown option, a value that looks like an option, a wrong number of
 * arguments, an unknown format, a value commander's parser would refuse) returns undefined and
 * goes to commander, which words those errors. What a fast path returns is what commander's action
 * passes to the command (test/fast-paths.test.ts runs every accepted line both ways); the only
 * errors raised here are the ones that action raises itself (`-l` with `-s`).
 */
import { IMAGE_FORMATS, type ImageFormat } from '../image-formats.js';
import { parseSize } from '../size.js';
import type { CheckCommandOptions } from './check.js';
import type { ConvertOptions } from './convert.js';
import { parseSnapshotOption, parseSparseSize } from './convert-args.js';
import type { CreateCommandOptions } from './create.js';
import type { InfoOptions } from './info.js';
import type { MapOptions } from './map.js';
import { asksOptionHelp } from './option-help.js';
import { isCacheMode } from './register-ops.js';
import type { SnapshotCommandOptions } from './snapshot.js';

export interface Parsed {
  readonly values: Map<string, string[]>;
  readonly flags: Set<string>;
  readonly operands: string[];
}

/** Splits `args` by the two option sets; undefined for anything else that starts with `-`. */
export function parse(
  args: readonly string[],
  withValue: ReadonlySet<string>,
  flagNames: ReadonlySet<string>,
): Parsed | undefined {
  const values = new Map<string, string[]>();
  const flags = new Set<string>();
  const operands: string[] = [];
  for (let index = 0; index < args.length; index++) {
    let arg = args[index]!;
    let value: string | undefined;
    const equals = arg.startsWith('--') ? arg.indexOf('=') : -1;
    if (equals > 0) {
      value = arg.slice(equals + 1);
      arg = arg.slice(0, equals);
      if (!withValue.has(arg)) return undefined;
    }
    if (withValue.has(arg)) {
      if (value === undefined) {
        value = args[index + 1];
        if (value === undefined || value.startsWith('-')) return undefined;
        index++;
      }
      values.set(arg, [...(values.get(arg) ?? []), value]);
    } else if (flagNames.has(arg)) {
      flags.add(arg);
    } else if (arg.startsWith('-') && arg !== '-') {
      return undefined;
    } else {
      operands.push(arg);
    }
  }
  return { values, flags, operands };
}

/** The last value of a single-valued option (commander keeps the last one given). */
export function last(parsed: Parsed, name: string): string | undefined {
  return parsed.values.get(name)?.at(-1);
}

const CREATE_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '-o', '-b', '-F']);
const CREATE_FLAGS: ReadonlySet<string> = new Set(['-u', '-q', '--debug']);

export interface CreateCommandLine {
  readonly file: string;
  readonly size: string | undefined;
  readonly options: CreateCommandOptions;
}

/** `args` are the arguments after `create`; undefined when commander has to look at them. */
export function createFastPath(args: readonly string[]): CreateCommandLine | undefined {
  const parsed = parse(args, CREATE_WITH_VALUE, CREATE_FLAGS);
  if (parsed === undefined || parsed.operands.length < 1 || parsed.operands.length > 2) return undefined;
  if (asksOptionHelp(parsed.values.get('-o'))) return undefined;
  return {
    file: parsed.operands[0]!,
    size: parsed.operands[1],
    options: {
      format: last(parsed, '-f') ?? 'raw',
      options: parsed.values.get('-o') ?? [],
      backingFile: last(parsed, '-b'),
      backingFormat: last(parsed, '-F'),
      unsafe: parsed.flags.has('-u'),
      quiet: parsed.flags.has('-q'),
    },
  };
}

/** `-f FMT`, `--output FMT` and `-U` / `--force-share` as info, map and check take them. */
function imageOptions(
  parsed: Parsed,
): { format: ImageFormat | undefined; output: 'human' | 'json'; forceShare: boolean } | undefined {
  const format = last(parsed, '-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  const output = last(parsed, '--output') ?? 'human';
  if (output !== 'human' && output !== 'json') return undefined;
  return {
    format: format as ImageFormat | undefined,
    output,
    forceShare: parsed.flags.has('-U') || parsed.flags.has('--force-share'),
  };
}

const COMMON_FLAGS = ['-U', '--force-share', '--debug'];

const CONVERT_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '-O', '-l', '-s', '-S', '-t', '-T']);
const CONVERT_FLAGS: ReadonlySet<string> = new Set([...COMMON_FLAGS, '-n', '-p', '-q']);

export interface ConvertCommandLine {
  readonly source: string;
  /** `-`: stdout. */
  readonly target: string;
  readonly options: ConvertOptions;
}

/**
 * `args` are the arguments after `convert`; undefined when commander has to look at them. Only raw
 * output is parsed here: `-O qcow2` (another command's options) goes to commander.
 */
export function convertFastPath(args: readonly string[]): ConvertCommandLine | undefined {
  const parsed = parse(args, CONVERT_WITH_VALUE, CONVERT_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 2) return undefined;
  const format = last(parsed, '-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  if ((last(parsed, '-O') ?? 'raw') !== 'raw') return undefined;
  // -t and -T are taken when they name a cache mode (-T changes nothing); else commander words it.
  const cache = last(parsed, '-t');
  if (cache !== undefined && !isCacheMode(cache)) return undefined;
  const sourceCache = last(parsed, '-T');
  if (sourceCache !== undefined && !isCacheMode(sourceCache)) return undefined;
  const sparse = last(parsed, '-S');
  let sparseSize: number | undefined;
  try {
    if (sparse !== undefined) sparseSize = parseSparseSize(sparse);
  } catch {
    return undefined; // commander words the error
  }
  return {
    source: parsed.operands[0]!,
    target: parsed.operands[1]!,
    options: {
      format: format as ImageFormat | undefined,
      outputFormat: 'raw',
      snapshot: parseSnapshotOption(last(parsed, '-l'), last(parsed, '-s')),
      progress: parsed.flags.has('-p') && !parsed.flags.has('-q'),
      quiet: parsed.flags.has('-q'),
      forceShare: parsed.flags.has('-U') || parsed.flags.has('--force-share'),
      noCreate: parsed.flags.has('-n'),
      targetIsZero: false,
      ...(cache === undefined ? {} : { cache }),
      ...(sparseSize === undefined ? {} : { sparseSize }),
    },
  };
}

const INFO_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '--output']);
const INFO_FLAGS: ReadonlySet<string> = new Set([...COMMON_FLAGS, '--backing-chain']);

export interface InfoCommandLine {
  readonly file: string;
  readonly options: InfoOptions;
}

/** `args` are the arguments after `info`; undefined when commander has to look at them. */
export function infoFastPath(args: readonly string[]): InfoCommandLine | undefined {
  const parsed = parse(args, INFO_WITH_VALUE, INFO_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 1) return undefined;
  const common = imageOptions(parsed);
  if (common === undefined) return undefined;
  return {
    file: parsed.operands[0]!,
    options: { ...common, backingChain: parsed.flags.has('--backing-chain') },
  };
}

const CHECK_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '--output', '-T', '-r']);
const CHECK_FLAGS: ReadonlySet<string> = new Set([...COMMON_FLAGS, '-q', '-p']);

export interface CheckCommandLine {
  readonly file: string;
  readonly options: CheckCommandOptions;
}

/** `args` are the arguments after `check`; undefined when commander has to look at them. */
export function checkFastPath(args: readonly string[]): CheckCommandLine | undefined {
  const parsed = parse(args, CHECK_WITH_VALUE, CHECK_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 1) return undefined;
  const common = imageOptions(parsed);
  if (common === undefined) return undefined;
  // -T is accepted (and ignored) when it names a cache mode.
  const cache = last(parsed, '-T');
  if (cache !== undefined && !isCacheMode(cache)) return undefined;
  const repair = last(parsed, '-r');
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') return undefined;
  return {
    file: parsed.operands[0]!,
    options: {
      ...common,
      quiet: parsed.flags.has('-q'),
      repair,
      progress: parsed.flags.has('-p'),
    },
  };
}

const MAP_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '--output', '--start-offset', '--max-length']);
const MAP_FLAGS: ReadonlySet<string> = new Set(COMMON_FLAGS);

export interface MapCommandLine {
  readonly file: string;
  readonly options: MapOptions;
}

/** `args` are the arguments after `map`; undefined when commander has to look at them. */
export function mapFastPath(args: readonly string[]): MapCommandLine | undefined {
  const parsed = parse(args, MAP_WITH_VALUE, MAP_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 1) return undefined;
  const common = imageOptions(parsed);
  if (common === undefined) return undefined;
  const start = last(parsed, '--start-offset');
  const length = last(parsed, '--max-length');
  let startOffset = 0;
  let maxLength: number | undefined;
  try {
    if (start !== undefined) startOffset = parseSize(start, 'start offset');
    if (length !== undefined) maxLength = parseSize(length, 'max length');
  } catch {
    return undefined; // commander words the error
  }
  return { file: parsed.operands[0]!, options: { ...common, startOffset, maxLength } };
}

const SNAPSHOT_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '-c', '-a', '-d']);
const SNAPSHOT_FLAGS: ReadonlySet<string> = new Set([...COMMON_FLAGS, '-l', '-q']);

export interface SnapshotCommandLine {
  readonly file: string;
  /** The action flags as commander hands them to `snapshotAction`. */
  readonly actions: { l?: boolean; c?: string; a?: string; d?: string };
  readonly options: SnapshotCommandOptions;
}

/** `args` are the arguments after `snapshot`; undefined when commander has to look at them. */
export function snapshotFastPath(args: readonly string[]): SnapshotCommandLine | undefined {
  const parsed = parse(args, SNAPSHOT_WITH_VALUE, SNAPSHOT_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 1) return undefined;
  const format = last(parsed, '-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  const actions: { l?: boolean; c?: string; a?: string; d?: string } = {};
  if (parsed.flags.has('-l')) actions.l = true;
  for (const name of ['c', 'a', 'd'] as const) {
    const value = last(parsed, `-${name}`);
    if (value !== undefined) actions[name] = value;
  }
  return {
    file: parsed.operands[0]!,
    actions,
    options: {
      format: format as ImageFormat | undefined,
      forceShare: parsed.flags.has('-U') || parsed.flags.has('--force-share'),
      quiet: parsed.flags.has('-q'),
    },
  };
}
