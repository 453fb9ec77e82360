/**
 * `qcow2 create` and `qcow2 info` command lines without commander: loading commander and building
 * every subcommand's definition is ~3 ms of a start that, for `create`, is most of the command.
 * As `convertFastPath` (convert-args.ts): only the plain spellings are parsed here (each flag and
 * its value their own arguments, `--output=FMT` too); anything else (bundled or attached flags,
 * `--help`, an unknown option, a value that looks like an option, a wrong number of arguments, an
 * unknown format) returns undefined and goes to commander, which words every error: the fast path
 * never reports one itself. What it returns is what commander's actions pass to the commands.
 */
import { IMAGE_FORMATS, type ImageFormat } from '../image-formats.js';
import type { CreateCommandOptions } from './create.js';
import type { InfoOptions } from './info.js';

interface Parsed {
  readonly values: Map<string, string[]>;
  readonly flags: Set<string>;
  readonly operands: string[];
}

/** Splits `args` by the two option sets; undefined for anything else that starts with `-`. */
function parse(
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
    } else if (arg.startsWith('-')) {
      return undefined;
    } else {
      operands.push(arg);
    }
  }
  return { values, flags, operands };
}

/** The last value of a single-valued option (commander keeps the last one given). */
function last(parsed: Parsed, name: string): string | undefined {
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

const INFO_WITH_VALUE: ReadonlySet<string> = new Set(['-f', '--output']);
const INFO_FLAGS: ReadonlySet<string> = new Set(['-U', '--force-share', '--backing-chain', '--debug']);

export interface InfoCommandLine {
  readonly file: string;
  readonly options: InfoOptions;
}

/** `args` are the arguments after `info`; undefined when commander has to look at them. */
export function infoFastPath(args: readonly string[]): InfoCommandLine | undefined {
  const parsed = parse(args, INFO_WITH_VALUE, INFO_FLAGS);
  if (parsed === undefined || parsed.operands.length !== 1) return undefined;
  const format = last(parsed, '-f');
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) return undefined;
  const output = last(parsed, '--output') ?? 'human';
  if (output !== 'human' && output !== 'json') return undefined;
  return {
    file: parsed.operands[0]!,
    options: {
      format: format as ImageFormat | undefined,
      output,
      backingChain: parsed.flags.has('--backing-chain'),
      forceShare: parsed.flags.has('-U') || parsed.flags.has('--force-share'),
    },
  };
}
