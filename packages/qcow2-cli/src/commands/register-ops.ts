/**
 * The subcommands beyond info, map, convert and check, registered on the program `run.ts`
 * builds. Each action imports its command module when it runs, so start-up stays light.
 */
import type { Command, Option as OptionClass } from 'commander';
import type { ImageFormat } from '../engine.js';
import { CliError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { parseSize, sizeInBytes } from '../size.js';
import { asksOptionHelp, createOptionHelp } from './option-help.js';

/** Formats `create -o help` lists the options of. */
function isCreatableFormat(format: unknown): boolean {
  return format === 'qcow2' || format === 'raw';
}

export interface RegisterContext {
  readonly program: Command;
  readonly Option: typeof OptionClass;
  readonly context: CommandContext;
  readonly setExit: (code: number) => void;
  /** Adds `-f FMT` (checked) and `-U` and the program's error handling to a command. */
  readonly addCommon: (command: Command) => Command;
}

const SUFFIX_HINT =
  'You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

/** Collects a repeatable option (`-o A -o B`) into a list, in command-line order. */
export function collectOptions(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** An integer in `[min, max]`, else a {@link UsageError} with `message`. */
/**
 * An integer written as C's strtol reads it with base 0, as qemu-img reads bench's numbers: leading
 * white space, a sign, then `0x` hexadecimal, `0` octal or decimal digits, nothing after them.
 */
export function parseCInteger(value: string): number {
  const match = /^[\t\n\v\f\r ]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$/.exec(value);
  if (match === null) return Number.NaN;
  const [, sign, hex, octal, decimal] = match;
  const magnitude =
    hex !== undefined
      ? Number.parseInt(hex, 16)
      : octal !== undefined
        ? Number.parseInt(octal, 8)
        : Number(decimal);
  return sign === '-' ? 0 - magnitude : magnitude;
}

export function integerParser(min: number, max: number, message: string): (value: string) => number {
  return (value) => {
    const parsed = parseCInteger(value);
    if (!Number.isSafeInteger(parsed) || parsed < min || parsed > max) throw new UsageError(message);
    return parsed;
  };
}

/** A size with qemu-img's suffixes, at most 2^31 - 1, else qemu-img's message for `what`. */
export function benchSizeParser(what: string): (value: string) => number {
  return (value) => {
    let size: number;
    try {
      size = parseSize(value, what);
    } catch {
      throw new UsageError(`Invalid ${what} specified. ${SUFFIX_HINT}`);
    }
    if (size > 2147483647) throw new UsageError(`Invalid ${what} specified. ${SUFFIX_HINT}`);
    return size;
  };
}

/** The largest value qemu-img's option parser (cvtnum) takes: INT64_MAX. */
const CVTNUM_MAX = 2n ** 63n - 1n;

/** qemu-img's `-r` rate limit (commit, convert): a size with suffixes, 0 (no limit) up to
 * 2^63 - 1 bytes a second, refused in qemu-img's words otherwise. Values beyond 2^53 are kept
 * approximately (a limit no copy reaches). */
export function rateLimitParser(value: string): number {
  const bytes = sizeInBytes(value);
  if (bytes === undefined || bytes === 'fraction') {
    throw new UsageError(`Invalid rate limit specified. ${SUFFIX_HINT}`);
  }
  if (bytes > CVTNUM_MAX) {
    throw new UsageError(`Invalid rate limit specified. Must be between 0 and ${CVTNUM_MAX}.`);
  }
  return Number(bytes);
}

/** QEMU's cache modes (`-t`, `-T`; `off` is QEMU's other name for `none`): checked, then the page
 * cache is used whatever the mode (convert's `-t` also decides when the target is flushed). */
export const CACHE_MODES = ['none', 'off', 'writeback', 'unsafe', 'directsync', 'writethrough'] as const;

export function isCacheMode(value: string): boolean {
  return (CACHE_MODES as readonly string[]).includes(value);
}

export function cacheParser(value: string): string {
  if (!isCacheMode(value)) throw new UsageError(`Invalid cache option: ${value}`);
  return value;
}

export function sourceCacheParser(value: string): string {
  if (!isCacheMode(value)) throw new UsageError(`Invalid source cache option: ${value}`);
  return value;
}

export function registerOpsCommands({ program, Option, context, setExit, addCommon }: RegisterContext): void {
  program
    .command('compare')
    .argument('<file1>', 'the first image')
    .argument('<file2>', 'the second image')
    .description('compare the guest content of two images (as qemu-img compare)')
    .addOption(new Option('-f <fmt>', 'format of the first image (default: detected)'))
    .addOption(new Option('-F <fmt>', 'format of the second image (default: detected)'))
    .addOption(new Option('-T <cache>', 'source cache mode (accepted; the page cache is always used)'))
    .option('-s', 'strict: sizes and allocation must match too')
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet: print nothing, only set the exit code')
    .addOption(new Option('-U, --force-share', 'open the images even if another process has them locked'))
    .exitOverride()
    .configureOutput(program.configureOutput())
    .addHelpText(
      'after',
      '\nExit codes: 0 identical, 1 different, 2 an image could not be opened, 3 block status failed,\n4 a read failed.\n\nExamples:\n  qcow2 compare disk.qcow2 disk.raw\n  qcow2 compare -s -f qcow2 -F raw disk.qcow2 disk.raw\n',
    )
    .action(async (first: string, second: string, options: Record<string, unknown>) => {
      const { compareCommand, COMPARE_OPEN_FAILED } = await import('./compare.js');
      const cache = options.T as string | undefined;
      if (cache !== undefined && !isCacheMode(cache)) {
        // qemu-img compare: exit 2 for every error before the comparison.
        throw new CliError(`Invalid source cache option: ${cache}`, { exitCode: COMPARE_OPEN_FAILED });
      }
      setExit(
        await compareCommand(context, first, second, {
          format: options.f as string | undefined,
          secondFormat: options.F as string | undefined,
          strict: options.s === true,
          progress: options.p === true,
          quiet: options.q === true,
          forceShare: options.forceShare === true,
        }),
      );
    });

  addCommon(program.command('bench').argument('<file>', 'the image'))
    .description('run a simple I/O benchmark on an image (as qemu-img bench)')
    .addOption(
      new Option('-c <count>', 'number of requests (default 75000)')
        .argParser(integerParser(0, 2147483647, 'Invalid request count specified'))
        .default(75000),
    )
    .addOption(
      new Option('-d <depth>', 'requests in flight (default 64)')
        .argParser(integerParser(1, 2147483647, 'Invalid queue depth specified'))
        .default(64),
    )
    .addOption(
      new Option('-s <size>', 'bytes per request (default 4k)')
        .argParser(benchSizeParser('buffer size'))
        .default(4096),
    )
    .addOption(
      new Option('-S <step>', 'bytes between requests (default: the buffer size)')
        .argParser(benchSizeParser('step_size'))
        .default(0),
    )
    .addOption(
      new Option('-o <offset>', 'offset of the first request')
        .argParser(benchSizeParser('offset'))
        .default(0),
    )
    .option('-w', 'write instead of read (raw images for now)')
    .addOption(
      new Option('--pattern <byte>', 'byte written by -w (default 0)')
        .argParser(integerParser(0, 255, 'Invalid pattern byte specified'))
        .default(0),
    )
    .addOption(
      new Option('--flush-interval <n>', 'flush every N requests (-w only)')
        .argParser(integerParser(0, 2147483647, 'Invalid flush interval specified'))
        .default(0),
    )
    .option('--no-drain', 'with --flush-interval: flush without waiting for requests in flight')
    .addOption(new Option('-t <cache>', 'cache mode (accepted; the page cache is always used)'))
    .addOption(new Option('-i <aio>', 'AIO mode: threads, native or io_uring (accepted)'))
    .option('-n', 'native AIO (same as -i native)')
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet: print nothing')
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 bench -c 100000 -d 16 disk.qcow2\n  qcow2 bench -w -s 64k -S 128k --pattern=0xab disk.raw\n',
    )
    .action(async (file: string, options: Record<string, unknown>) => {
      const { benchCommand } = await import('./bench.js');
      setExit(
        await benchCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          count: options.c as number,
          depth: options.d as number,
          bufferSize: options.s as number,
          step: options.S as number,
          offset: options.o as number,
          write: options.w === true,
          pattern: options.pattern as number,
          flushInterval: options.flushInterval as number,
          drain: options.drain !== false,
          cache: options.t as string | undefined,
          aio: options.n === true ? 'native' : (options.i as string | undefined),
          quiet: options.q === true,
          progress: options.p === true,
          forceShare: options.forceShare === true,
        }),
      );
    });

  addCommon(
    program.command('dd').argument('[operands...]', 'if=INPUT of=OUTPUT [bs=SIZE] [count=N] [skip=N]'),
  )
    .description('copy part of an image into a new raw file or qcow2 image, dd style (as qemu-img dd)')
    .addOption(new Option('-O <fmt>', 'output format: raw (default) or qcow2').default('raw'))
    .addHelpText(
      'after',
      '\nAs in qemu-img, count=N ends the copy at N*bs bytes into the input (skip included).\n\nExamples:\n  qcow2 dd if=disk.qcow2 of=first-mib.raw bs=1M count=1\n  qcow2 dd -f qcow2 if=disk.qcow2 of=tail.raw bs=64k skip=16\n  qcow2 dd -O qcow2 if=disk.raw of=head.qcow2 bs=1M count=512\n',
    )
    .action(async (operands: string[], options: Record<string, unknown>) => {
      const { ddCommand, parseDdOperands } = await import('./dd.js');
      setExit(
        await ddCommand(context, parseDdOperands(operands), {
          format: options.f as ImageFormat | undefined,
          outputFormat: options.O as string,
          forceShare: options.forceShare === true,
        }),
      );
    });

  program
    .command('create')
    .argument('[file]', 'the image to create')
    .argument('[size]', 'guest size (suffixes k, M, G, T, P, E); default: the backing file size')
    .description('create a new image (as qemu-img create)')
    .addOption(new Option('-f <fmt>', 'qcow2 or raw').default('raw'))
    .addOption(
      new Option(
        '-o <options>',
        'cluster_size=,refcount_bits=,extended_l2=,compat=,lazy_refcounts=,...',
      ).argParser(collectOptions),
    )
    .addOption(new Option('-b <backing>', 'backing file (relative to the new image)'))
    .addOption(new Option('-F <fmt>', 'backing file format'))
    .option('-u', 'unsafe: do not open the backing file (a size is needed)')
    .option('-q', 'quiet: no "Formatting" line')
    .exitOverride()
    .configureOutput(program.configureOutput())
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 create -f qcow2 disk.qcow2 20G\n  qcow2 create -f qcow2 -o cluster_size=4k,refcount_bits=64 disk.qcow2 1T\n  qcow2 create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2\n',
    )
    .action(async (file: string | undefined, size: string | undefined, options: Record<string, unknown>) => {
      if (asksOptionHelp(options.o as string[] | undefined) && isCreatableFormat(options.f)) {
        context.io.stdout.write(createOptionHelp(options.f as string, file !== undefined));
        return;
      }
      if (file === undefined) throw new UsageError("missing required argument 'file'");
      const { createCommand } = await import('./create.js');
      setExit(
        await createCommand(context, file, size, {
          format: options.f as string,
          options: (options.o as string[] | undefined) ?? [],
          backingFile: options.b as string | undefined,
          backingFormat: options.F as string | undefined,
          unsafe: options.u === true,
          quiet: options.q === true,
        }),
      );
    });

  addCommon(program.command('snapshot').argument('<file>', 'the image'))
    .description('list, create, apply or delete internal snapshots (as qemu-img snapshot)')
    .option('-l', 'list the snapshots')
    .addOption(new Option('-c <name>', 'create a snapshot'))
    .addOption(new Option('-a <snapshot>', 'apply (revert to) a snapshot, by id or name'))
    .addOption(new Option('-d <snapshot>', 'delete a snapshot, by id or name'))
    .option('-q', 'quiet')
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 snapshot -c before-upgrade disk.qcow2\n  qcow2 snapshot -l disk.qcow2\n  qcow2 snapshot -a before-upgrade disk.qcow2\n',
    )
    .action(async (file: string, options: Record<string, unknown>) => {
      const { snapshotAction, snapshotCommand } = await import('./snapshot.js');
      setExit(
        await snapshotCommand(
          context,
          file,
          snapshotAction(options as { l?: boolean; c?: string; a?: string; d?: string }),
          {
            format: options.f as ImageFormat | undefined,
            forceShare: options.forceShare === true,
            quiet: options.q === true,
          },
        ),
      );
    });

  program
    .command('resize')
    .argument('<file>', 'the image')
    .argument('<size>', 'new size, or +SIZE / -SIZE relative to the current one')
    .description('change the guest size (as qemu-img resize)')
    .addOption(
      new Option('-f <fmt>', 'image format: qcow2 or raw (default: detected)').argParser((value: string) => {
        if (value !== 'qcow2' && value !== 'raw' && value !== 'qcow') {
          throw new UsageError(`Unknown driver '${value}' (formats: qcow2, qcow, raw)`);
        }
        return value;
      }),
    )
    .option('--shrink', 'allow shrinking (data past the new end is lost)')
    .addOption(new Option('--preallocation <mode>', 'the grown range: off (default), falloc or full'))
    .option('-q', 'quiet')
    // `-1G` is a size, not an option: unknown dashes reach the arguments and are checked there.
    .allowUnknownOption(true)
    .exitOverride()
    .configureOutput(program.configureOutput())
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 resize disk.qcow2 +10G\n  qcow2 resize --shrink disk.qcow2 -1G\n  qcow2 resize --preallocation=falloc disk.raw 20G\n',
    )
    .action(async (file: string, size: string, options: Record<string, unknown>, command: Command) => {
      const extra = command.args.slice(2);
      const stray = [file, ...extra].find((arg) => arg.startsWith('-'));
      if (stray !== undefined) throw new UsageError(`unknown option '${stray}'`);
      if (extra.length > 0) throw new UsageError("too many arguments for 'resize'");
      if (size.startsWith('-') && !/^-\d/.test(size)) throw new UsageError(`unknown option '${size}'`);
      const { resizeCommand } = await import('./resize.js');
      setExit(
        await resizeCommand(context, file, size, {
          format: options.f as ImageFormat | undefined,
          shrink: options.shrink === true,
          quiet: options.q === true,
          preallocation: options.preallocation as string | undefined,
        }),
      );
    });

  addCommon(program.command('amend').argument('[file]', 'the image'))
    .description('change options of an existing qcow2 image (as qemu-img amend)')
    .addOption(
      new Option(
        '-o <options>',
        'compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N, size=SIZE',
      ).argParser(collectOptions),
    )
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet')
    .addOption(
      new Option('-t <cache>', 'cache mode (accepted; the page cache is always used)').argParser(cacheParser),
    )
    .option('--force', 'accepted (no option amend changes needs it)')
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 amend -o refcount_bits=64 disk.qcow2\n  qcow2 amend -o compat=0.10 disk.qcow2\n',
    )
    .action(async (file: string | undefined, options: Record<string, unknown>) => {
      if (
        asksOptionHelp(options.o as string[] | undefined) &&
        (options.f === 'qcow2' || file !== undefined)
      ) {
        const { amendHelp } = await import('./amend.js');
        context.io.stdout.write(await amendHelp(context, file, options.f as ImageFormat | undefined));
        return;
      }
      if (file === undefined) throw new UsageError("missing required argument 'file'");
      const { amendCommand } = await import('./amend.js');
      setExit(
        await amendCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          options: (options.o as string[] | undefined) ?? [],
          progress: options.p === true,
          quiet: options.q === true,
        }),
      );
    });

  addCommon(program.command('commit').argument('<file>', 'the image whose data goes into its backing file'))
    .description("write an image's own data into its backing file (as qemu-img commit)")
    .addOption(new Option('-b <base>', 'commit into this image of the backing chain (implies -d)'))
    .option('-d', 'keep the data in the image after committing it')
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet')
    .addOption(
      new Option('-r <rate>', 'at most this many bytes per second (size suffixes allowed)').argParser(
        rateLimitParser,
      ),
    )
    .addOption(
      new Option('-t <cache>', 'cache mode (accepted; the page cache is always used)').argParser(cacheParser),
    )
    .addHelpText(
      'after',
      '\nWithout -b the image is emptied after the commit (unless -d); with -b BASE every image\nabove BASE keeps its data, as in qemu-img.\n\nExamples:\n  qcow2 commit -p overlay.qcow2\n  qcow2 commit -b base.qcow2 top.qcow2\n',
    )
    .action(async (file: string, options: Record<string, unknown>) => {
      const { commitCommand } = await import('./commit.js');
      setExit(
        await commitCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          base: options.b as string | undefined,
          keep: options.d === true,
          progress: options.p === true,
          quiet: options.q === true,
          rateLimit: options.r as number | undefined,
        }),
      );
    });

  addCommon(program.command('rebase').argument('<file>', 'the image'))
    .description('change the backing file of an image (as qemu-img rebase)')
    .addOption(new Option('-b <backing>', "the new backing file ('' for none; with -u, none by default)"))
    .addOption(
      new Option('-F <fmt>', 'format of the new backing file').argParser((value: string) => {
        if (value !== 'qcow2' && value !== 'raw' && value !== 'qcow') {
          throw new UsageError(`Unknown driver '${value}' (formats: qcow2, qcow, raw)`);
        }
        return value;
      }),
    )
    .option('-u', 'unsafe: only rewrite the name, copy nothing')
    .addOption(
      new Option('-t <cache>', 'cache mode (accepted; the page cache is always used)').argParser(cacheParser),
    )
    .addOption(
      new Option('-T <cache>', 'source cache mode (accepted; the page cache is always used)').argParser(
        sourceCacheParser,
      ),
    )
    .option('-p', 'show a progress bar on stderr')
    .option('-q', 'quiet')
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 rebase -b new-base.qcow2 -F qcow2 overlay.qcow2\n  qcow2 rebase -u -b moved/base.qcow2 -F qcow2 overlay.qcow2\n',
    )
    .action(async (file: string, options: Record<string, unknown>) => {
      // As qemu-img: -b is needed unless -u, where leaving it out removes the backing file.
      if (options.b === undefined && options.u !== true) {
        throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
      }
      const { rebaseCommand } = await import('./rebase.js');
      setExit(
        await rebaseCommand(context, file, {
          format: options.f as ImageFormat | undefined,
          backingFile: (options.b as string | undefined) ?? '',
          backingFormat: options.F as ImageFormat | undefined,
          unsafe: options.u === true,
          progress: options.p === true,
          quiet: options.q === true,
        }),
      );
    });

  program
    .command('measure')
    .argument('[file]', 'the image to convert (or --size)')
    .description('how much space a new image or a conversion needs (as qemu-img measure)')
    .addOption(new Option('--output <fmt>', 'human or json').choices(['human', 'json']).default('human'))
    .addOption(new Option('-O <fmt>', 'output format: qcow2 or raw').default('raw'))
    .addOption(new Option('-o <options>', 'qcow2 options, as for create').argParser(collectOptions))
    .addOption(new Option('--size <size>', 'measure a new empty image of this size'))
    .addOption(
      new Option('-f <fmt>', 'image format: qcow2, qcow or raw (default: detected)').argParser(
        (value: string) => {
          if (value !== 'qcow2' && value !== 'raw' && value !== 'qcow') {
            throw new UsageError(`Unknown driver '${value}' (formats: qcow2, qcow, raw)`);
          }
          return value;
        },
      ),
    )
    .addOption(new Option('-l <snapshot>', 'snapshot.name=NAME, snapshot.id=ID, or an id or name'))
    .addOption(new Option('-U, --force-share', 'open the image even if another process has it locked'))
    .exitOverride()
    .configureOutput(program.configureOutput())
    .addHelpText(
      'after',
      '\nExamples:\n  qcow2 measure -O qcow2 --size 100G\n  qcow2 measure --output=json -O qcow2 -o cluster_size=2M disk.raw\n',
    )
    .action(async (file: string | undefined, options: Record<string, unknown>) => {
      const [{ measureCommand }, { parseSnapshotOption }] = await Promise.all([
        import('./measure.js'),
        import('./convert-args.js'),
      ]);
      setExit(
        await measureCommand(context, file, {
          output: options.output as 'human' | 'json',
          outputFormat: options.O as string,
          options: (options.o as string[] | undefined) ?? [],
          size: options.size as string | undefined,
          format: options.f as ImageFormat | undefined,
          snapshot: parseSnapshotOption(options.l as string | undefined, undefined),
          forceShare: options.forceShare === true,
        }),
      );
    });
}
