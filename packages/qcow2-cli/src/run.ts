/**
 * The `qcow2` command line, testable in-process: `run(argv, io)` parses the arguments, runs one
 * subcommand and returns the exit code. Nothing here touches `process`.
 *
 * Start-up is part of every command's time, so nothing heavy loads before it is needed: commander
 * and each subcommand's module are imported when used (`import()` in the actions), the format
 * names come from a module of their own (not the engine), and `--version` and plain `qcow2
 * convert`, `create`, `info`, `check`, `map` and `snapshot` command lines (see
 * commands/fast-paths.ts) run without commander at all. Anything those fast paths do not
 * recognise goes through commander, so messages stay the same.
 */
import type { Command } from 'commander';
import { registerBitmapCommand } from './commands/bitmap.js';
import {
  parseSnapshotOption,
  parseSparseSize,
  refuseConvertFlags,
  refuseForSeveralSources,
} from './commands/convert-args.js';
import {
  checkFastPath,
  convertFastPath,
  createFastPath,
  infoFastPath,
  mapFastPath,
  snapshotFastPath,
} from './commands/fast-paths.js';
import { asksOptionHelp, createOptionHelp } from './commands/option-help.js';
import {
  cacheParser,
  collectOptions,
  rateLimitParser,
  registerOpsCommands,
  sourceCacheParser,
} from './commands/register-ops.js';
import { CliError, debugTrace, describeError, UsageError } from './errors.js';
import { IMAGE_FORMATS, type ImageFormat } from './image-formats.js';
import type { CliIo, CommandContext } from './io.js';
import { parseSize } from './size.js';

export { parseSnapshotOption };

type Commander = typeof import('commander');

export const VERSION = '0.1.0';

/** Runs the CLI with `argv` (the arguments after the program name). Resolves to the exit code. */
export async function run(argv: readonly string[], io: CliIo): Promise<number> {
  const context: CommandContext = { io };
  let exitCode = 0;
  let commander: Commander | undefined;
  try {
    if (argv.filter((arg) => arg !== '--debug').length === 0) {
      throw new UsageError(
        "a command is needed: amend, bench, bitmap, check, commit, compare, convert, create, dd, info, map, measure, rebase, resize or snapshot ('qcow2 --help' tells more)",
      );
    }
    if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
      // What commander prints for it, without loading commander (start-up time).
      io.stdout.write(`${VERSION}\n`);
      return 0;
    }
    const fast = await runFastPath(context, argv);
    if (fast !== undefined) return fast;
    commander = await import('commander');
    const program = buildProgram(commander, context, (code) => {
      exitCode = code;
    });
    await program.parseAsync([...argv], { from: 'user' });
    return exitCode;
  } catch (error) {
    if (commander !== undefined && error instanceof commander.CommanderError) {
      // Help and version exit 0; commander already printed the problem line through outputError.
      return error.exitCode === 0 ? 0 : 1;
    }
    return reportFailure(argv, io, error);
  }
}

/**
 * How a command that failed ends: one line on stderr (and the stack trace when `--debug` or
 * QCOW2_DEBUG=1 asks for it), and the exit code. Shared with the subcommands the bin runs from
 * bundles of their own (bin/qcow2-create.ts).
 */
export function reportFailure(argv: readonly string[], io: CliIo, error: unknown): number {
  io.stderr.write(`qcow2: ${describeError(error)}\n`);
  if (argv.includes('--debug') || io.env.QCOW2_DEBUG === '1') io.stderr.write(`${debugTrace(error)}\n`);
  return error instanceof CliError ? error.exitCode : 1;
}

/** A plain command line run without commander (see commands/fast-paths.ts); undefined if none. */
async function runFastPath(context: CommandContext, argv: readonly string[]): Promise<number | undefined> {
  const args = argv.slice(1);
  switch (argv[0]) {
    case 'convert': {
      const line = convertFastPath(args);
      if (line === undefined) return undefined;
      const { convertCommand } = await import('./commands/convert.js');
      return await convertCommand(context, line.source, line.target, line.options);
    }
    case 'create': {
      const line = createFastPath(args);
      if (line === undefined) return undefined;
      const { createCommand } = await import('./commands/create.js');
      return await createCommand(context, line.file, line.size, line.options);
    }
    case 'info': {
      const line = infoFastPath(args);
      if (line === undefined) return undefined;
      const { infoCommand } = await import('./commands/info.js');
      return await infoCommand(context, line.file, line.options);
    }
    case 'check': {
      const line = checkFastPath(args);
      if (line === undefined) return undefined;
      const { checkCommand } = await import('./commands/check.js');
      return await checkCommand(context, line.file, line.options);
    }
    case 'map': {
      const line = mapFastPath(args);
      if (line === undefined) return undefined;
      const { mapCommand } = await import('./commands/map.js');
      return await mapCommand(context, line.file, line.options);
    }
    case 'snapshot': {
      const line = snapshotFastPath(args);
      if (line === undefined) return undefined;
      const { snapshotAction, snapshotCommand } = await import('./commands/snapshot.js');
      return await snapshotCommand(context, line.file, snapshotAction(line.actions), line.options);
    }
    default:
      return undefined;
  }
}

function buildProgram(
  { Command, Option }: Commander,
  context: CommandContext,
  setExit: (code: number) => void,
): Command {
  const { io } = context;
  const program = new Command('qcow2');
  program
    .description('Inspect, create, convert and change QEMU disk images (qcow2, qcow, raw) without QEMU.')
    .version(VERSION, '-V, --version')
    .option('--debug', 'show stack traces of errors (also QCOW2_DEBUG=1)')
    .showSuggestionAfterError(false)
    .exitOverride()
    .configureOutput({
      writeOut: (text) => io.stdout.write(text),
      writeErr: (text) => io.stderr.write(text),
      outputError: (text, write) =>
        write(
          `qcow2: ${text
            .replace(/^error: /, '')
            .replace(/\s*\n\s*/g, ' ')
            .trim()}\n`,
        ),
    });
  const addCommon = (command: Command) =>
    command
      .addOption(
        new Option('-f <fmt>', 'image format: qcow2, qcow or raw (default: detected)').argParser(parseFormat),
      )
      .addOption(new Option('-U, --force-share', 'open the image even if another process has it locked'))
      .exitOverride()
      .configureOutput(program.configureOutput());
  const outputOption = () =>
    new Option('--output <fmt>', 'human or json').choices(['human', 'json']).default('human');

  addCommon(program.command('info').argument('<file>', 'the image'))
    .description('show an image: size, format, backing file, snapshots (as qemu-img info)')
    .addOption(outputOption())
    .option('--backing-chain', 'show every image of the backing chain')
    .addHelpText('after', '\nExample:\n  qcow2 info --output=json disk.qcow2\n')
    .action(async (file: string, options: Record<string, unknown>) => {
      const { infoCommand } = await import('./commands/info.js');
      setExit(
        await infoCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          output: options.output as 'human' | 'json',
          backingChain: options.backingChain === true,
          forceShare: options.forceShare === true,
        }),
      );
    });

  addCommon(program.command('map').argument('<file>', 'the image'))
    .description('show where the guest data lives (as qemu-img map)')
    .addOption(outputOption())
    .addOption(
      new Option('--start-offset <size>', 'first guest byte to map').argParser(sizeParser('start offset')),
    )
    .addOption(new Option('--max-length <size>', 'how many bytes to map').argParser(sizeParser('max length')))
    .addHelpText('after', '\nExample:\n  qcow2 map --output=json disk.qcow2\n')
    .action(async (file: string, options: Record<string, unknown>) => {
      const { mapCommand } = await import('./commands/map.js');
      setExit(
        await mapCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          output: options.output as 'human' | 'json',
          startOffset: (options.startOffset as number | undefined) ?? 0,
          maxLength: options.maxLength as number | undefined,
          forceShare: options.forceShare === true,
        }),
      );
    });

  addCommon(
    program
      .command('convert')
      .argument(
        '[files...]',
        "the images to read (several: one after the other), then the file to write ('-': stdout)",
      ),
  )
    .description(
      'convert an image (or several, concatenated) to a sparse raw file or a new qcow2 image (as qemu-img convert)',
    )
    .addOption(new Option('-O <fmt>', 'output format: raw or qcow2').default('raw'))
    .addOption(new Option('-l <snapshot>', 'snapshot.name=NAME, snapshot.id=ID, or an id or name'))
    .addOption(new Option('-s <snapshot>', 'snapshot id or name'))
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet: no progress bar even with -p')
    .addOption(new Option('-o <options>', '-O qcow2: options as for create').argParser(collectOptions))
    .option('-c', '-O qcow2: compressed clusters')
    .addOption(new Option('-B <backing>', '-O qcow2: backing file of the new image'))
    .addOption(new Option('-F <fmt>', '-O qcow2: format of the backing file'))
    .addOption(new Option('-m <n>', 'requests in flight, 1 to 16').argParser(coroutineCount))
    .addOption(
      new Option(
        '-S <size>',
        '-O raw: zero runs of this size become holes (default 4k; 0: fully allocated)',
      ).argParser(parseSparseSize),
    )
    .option('-W', 'out-of-order writes (accepted)')
    .option(
      '-C',
      'copy offloading: data copied whole, file to file in the kernel where it can (copy_file_range)',
    )
    .addOption(
      new Option(
        '-r <rate>',
        'at most this many bytes a second written to the target (size suffixes allowed)',
      ).argParser(rateLimitParser),
    )
    .option('--salvage', 'keep going on read errors of the sources: what cannot be read becomes zeros')
    .addOption(
      new Option(
        '-t <cache>',
        'target cache mode: unsafe (default) never flushes the target; writeback and none flush it once at the end; writethrough and directsync after every write (no O_DIRECT: the page cache is always used)',
      ).argParser(cacheParser),
    )
    .addOption(
      new Option('-T <cache>', 'source cache mode (accepted; the page cache is always used)').argParser(
        sourceCacheParser,
      ),
    )
    .option('-n', 'write into the existing target (do not create it)')
    .option('--target-is-zero', 'with -n: the target reads as zeros already (nothing is zeroed)')
    .option('--bitmaps', "-O qcow2: copy the source's persistent dirty bitmaps")
    .option('--skip-broken-bitmaps', 'with --bitmaps: skip inconsistent bitmaps (with a warning)')
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 convert -p -O raw disk.qcow2 disk.raw\n  qcow2 convert -O qcow2 -c -o cluster_size=2M disk.raw disk.qcow2\n  qcow2 convert -O raw part1.qcow2 part2.qcow2 whole.raw\n',
    )
    .action(async (files: string[], options: Record<string, unknown>) => {
      // Before anything else, as qemu-img checks them.
      refuseConvertFlags({
        compress: options.c === true,
        copyOffload: options.C === true,
        sparseGiven: options.S !== undefined,
        salvage: options.salvage === true,
      });
      const createOptions = (options.o as string[] | undefined) ?? [];
      if (asksOptionHelp(createOptions) && (options.O === 'raw' || options.O === 'qcow2')) {
        io.stdout.write(createOptionHelp(options.O, files.length >= 2));
        return;
      }
      // The last name is the target, the others the sources.
      if (files.length < 2) throw new UsageError('Must specify image file name');
      const sources = files.slice(0, -1);
      const target = files.at(-1)!;
      // One source is passed as its name, as the fast paths pass it.
      const source = sources.length === 1 ? sources[0]! : sources;
      if (options.targetIsZero === true && options.n !== true) {
        throw new UsageError('--target-is-zero requires use of -n flag');
      }
      const bitmaps = {
        bitmaps: options.bitmaps === true,
        skipBrokenBitmaps: options.skipBrokenBitmaps === true,
      };
      if (bitmaps.skipBrokenBitmaps && !bitmaps.bitmaps) {
        throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps');
      }
      const common = {
        format: options.f as ImageFormat | undefined,
        snapshot: parseSnapshotOption(options.l as string | undefined, options.s as string | undefined),
        progress: options.p === true && options.q !== true,
        quiet: options.q === true,
        forceShare: options.forceShare === true,
        noCreate: options.n === true,
        targetIsZero: options.targetIsZero === true,
        ...(options.salvage === true ? { salvage: true } : {}),
        ...(options.C === true ? { copyOffload: true } : {}),
        ...(options.r === undefined ? {} : { rateLimit: options.r as number }),
        ...(options.t === undefined ? {} : { cache: options.t as string }),
      };
      refuseForSeveralSources(sources.length, { snapshot: common.snapshot });
      if (options.O === 'qcow2') {
        const { convertToQcow2Command } = await import('./commands/convert-qcow2.js');
        setExit(
          await convertToQcow2Command(context, source, target, {
            ...common,
            outputFormat: 'qcow2',
            createOptions,
            compress: options.c === true,
            backingFile: options.B as string | undefined,
            backingFormat: options.F as string | undefined,
            parallel: options.m as number | undefined,
            ...(options.S === undefined ? {} : { sparseSize: options.S as number }),
            ...bitmaps,
          }),
        );
        return;
      }
      if (options.O === 'raw') {
        // As qemu-img: a raw target has no compressed clusters and no backing file, and takes only
        // raw's creation options.
        if (options.B !== undefined) throw new CliError("Backing file not supported for file format 'raw'");
        if (options.c === true) throw new CliError('Compression not supported for this file format');
      }
      refuseForSeveralSources(sources.length, { bitmaps: bitmaps.bitmaps });
      if (bitmaps.bitmaps && options.O === 'raw') {
        const { refuseBitmapsTo } = await import('./commands/convert-bitmaps.js');
        await refuseBitmapsTo(context, sources[0]!, 'raw', { ...common, outputFormat: 'raw', ...bitmaps });
      }
      const { convertCommand } = await import('./commands/convert.js');
      setExit(
        await convertCommand(context, source, target, {
          ...common,
          outputFormat: options.O as string,
          ...(createOptions.length === 0 ? {} : { createOptions }),
          ...(options.S === undefined ? {} : { sparseSize: options.S as number }),
          ...(options.m === undefined ? {} : { parallel: options.m as number }),
        }),
      );
    });

  addCommon(program.command('check').argument('<file>', 'the image'))
    .description('check an image for consistency; -r repairs it (as qemu-img check)')
    .addOption(outputOption())
    .option('-q', 'quiet: print nothing, only set the exit code')
    .addOption(
      new Option('-T <cache>', 'source cache mode (accepted; the page cache is always used)').argParser(
        sourceCacheParser,
      ),
    )
    .addOption(
      new Option('-r <mode>', 'repair: leaks or all (writes to the image)').choices(['leaks', 'all']),
    )
    .option('-p', 'show a progress bar on stderr')
    .addHelpText(
      'after',
      '\nExit codes: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check could not run,\n63 the format has no checks (raw).\n\nExample:\n  qcow2 check disk.qcow2\n',
    )
    .action(async (file: string, options: Record<string, unknown>) => {
      const { checkCommand } = await import('./commands/check.js');
      setExit(
        await checkCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          output: options.output as 'human' | 'json',
          forceShare: options.forceShare === true,
          quiet: options.q === true,
          repair: options.r as 'leaks' | 'all' | undefined,
          progress: options.p === true,
        }),
      );
    });

  registerOpsCommands({ program, Option, context, setExit, addCommon });
  registerBitmapCommand({ program, Option, context, setExit, addCommon });

  // `help COMMAND` of our own: an unknown command is one line, not the whole usage on stderr.
  program.helpCommand(false);
  program
    .command('help')
    .argument('[command]', 'the command to describe')
    .description('show the usage of a command')
    .action((name: string | undefined) => {
      if (name === undefined) {
        program.outputHelp();
        return;
      }
      const command = program.commands.find((candidate) => candidate.name() === name);
      if (command === undefined || command.name() === 'help')
        throw new UsageError(`unknown command '${name}'`);
      command.outputHelp();
    });

  program.addHelpText(
    'after',
    '\nExamples:\n  qcow2 info disk.qcow2\n  qcow2 map --output=json disk.qcow2\n  qcow2 convert -p -O raw disk.qcow2 disk.raw\n  qcow2 check disk.qcow2\n  qcow2 compare disk.qcow2 disk.raw\n  qcow2 dd if=disk.qcow2 of=head.raw bs=1M count=1\n  qcow2 bench -c 10000 disk.qcow2\n',
  );
  return program;
}

function parseFormat(value: string): ImageFormat {
  if (!(IMAGE_FORMATS as readonly string[]).includes(value)) {
    throw new UsageError(`Unknown driver '${value}' (formats: ${IMAGE_FORMATS.join(', ')})`);
  }
  return value as ImageFormat;
}

/** `convert -m`: qemu-img takes 1 to 16 (its coroutines), and words a refusal so. */
function coroutineCount(value: string): number {
  const parsed = Number(value);
  if (!Number.isSafeInteger(parsed) || parsed < 1 || parsed > MAX_COROUTINES)
    throw new UsageError(
      `Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`,
    );
  return parsed;
}

const MAX_COROUTINES = 16;

function sizeParser(what: string): (value: string) => number {
  return (value) => parseSize(value, what);
}
