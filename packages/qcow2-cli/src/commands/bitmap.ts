/**
 * `qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
 * [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILE BITMAP`: qemu-img bitmap's
 * operations on a qcow2 image's persistent dirty bitmaps, run in command-line order, with its
 * messages and exit codes (1 on any failure; the operations before a failed one are kept).
 *
 * Only the registration is loaded at start-up; the command imports the engine when it runs.
 */
import type { Command } from 'commander';
import type { ImageFormat } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import type { RegisterContext } from './register-ops.js';

export type BitmapOperation =
  | { readonly kind: 'add' | 'remove' | 'clear' | 'enable' | 'disable' }
  | { readonly kind: 'merge'; readonly source: string };

export interface BitmapCommandOptions {
  readonly operations: readonly BitmapOperation[];
  readonly format?: ImageFormat | undefined;
  /** -g, as typed (a size with qemu-img's suffixes). */
  readonly granularity?: string | undefined;
  /** -b and -F: the image --merge reads its source bitmap from. */
  readonly sourceFile?: string | undefined;
  readonly sourceFormat?: ImageFormat | undefined;
}

/** Checks the command line as qemu-img does, before opening anything. */
export function validateBitmapArguments(
  file: string | undefined,
  bitmap: string | undefined,
  options: BitmapCommandOptions,
): { file: string; bitmap: string } {
  const { operations } = options;
  if (operations.length === 0) {
    throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  }
  if (options.granularity !== undefined && !operations.some((op) => op.kind === 'add')) {
    throw new UsageError('granularity only supported with --add');
  }
  if (options.sourceFile !== undefined && !operations.some((op) => op.kind === 'merge')) {
    throw new UsageError('Merge bitmap source file only supported with --merge');
  }
  if (options.sourceFormat !== undefined && options.sourceFile === undefined) {
    throw new UsageError('-F only supported with -b');
  }
  if (file === undefined || bitmap === undefined) throw new UsageError('Expecting filename and bitmap name');
  return { file, bitmap };
}

export async function bitmapCommand(
  context: CommandContext,
  fileArgument: string | undefined,
  bitmapArgument: string | undefined,
  options: BitmapCommandOptions,
): Promise<number> {
  const { file, bitmap } = validateBitmapArguments(fileArgument, bitmapArgument, options);
  let granularity: number | undefined;
  if (options.granularity !== undefined) {
    const { parseSize } = await import('../size.js');
    try {
      granularity = parseSize(options.granularity, 'granularity');
    } catch {
      throw new UsageError('Invalid granularity specified');
    }
  }
  const [{ Qcow2Image, readStoredBitmap }, { openWritable }, { openImage }, { resolveAgainst }] =
    await Promise.all([
      import('@qcowkit/qcow2-core'),
      import('./writable-image.js'),
      import('../engine.js'),
      import('../paths.js'),
    ]);
  const image = await openWritable(resolveAgainst(context.io.cwd, file), file, { format: options.format });
  let failure: CliError | undefined;
  try {
    const device = image.device;
    if (!(device instanceof Qcow2Image)) {
      throw new CliError(`Could not open '${file}': persistent bitmaps need a qcow2 image`, {
        code: 'EUNSUPPORTED',
      });
    }
    const bitmaps = await device.persistentBitmaps();
    for (const operation of options.operations) {
      try {
        switch (operation.kind) {
          case 'add':
            bitmaps.add(bitmap, { ...(granularity === undefined ? {} : { granularity }) });
            break;
          case 'remove':
            bitmaps.remove(bitmap);
            break;
          case 'clear':
            bitmaps.clear(bitmap);
            break;
          case 'enable':
          case 'disable':
            bitmaps.setEnabled(bitmap, operation.kind === 'enable');
            break;
          case 'merge': {
            if (options.sourceFile === undefined) {
              bitmaps.merge(bitmap, await bitmaps.currentBits(operation.source), device.size);
              break;
            }
            const source = await openImage(resolveAgainst(context.io.cwd, options.sourceFile), {
              displayName: options.sourceFile,
              format: options.sourceFormat,
              forceShare: true,
              openBacking: false,
            });
            try {
              const sourceImage = source.image;
              if (
                !(sourceImage instanceof Qcow2Image) ||
                !sourceImage.bitmapDirectory.some((entry) => entry.name === operation.source)
              ) {
                throw new CliError(`Dirty bitmap '${operation.source}' not found`, { code: 'ENOENT' });
              }
              const bits = await readStoredBitmap(sourceImage, operation.source);
              bitmaps.merge(bitmap, bits, sourceImage.size);
            } finally {
              await source.close();
            }
            break;
          }
        }
      } catch (error) {
        failure = new CliError(
          `Operation ${operation.kind} on bitmap ${bitmap} failed: ${describeError(error)}`,
          {
            cause: error,
          },
        );
        break;
      }
    }
  } finally {
    // What the operations before a failure did is stored, as qemu-img keeps it.
    await image.close();
  }
  if (failure !== undefined) throw failure;
  return 0;
}

/** Registers `qcow2 bitmap` on the program (operations collected in command-line order). */
export function registerBitmapCommand({
  program,
  Option,
  context,
  setExit,
  addCommon,
}: RegisterContext): void {
  let operations: BitmapOperation[] = [];
  const command: Command = addCommon(
    program.command('bitmap').argument('[file]', 'the image').argument('[bitmap]', 'the bitmap'),
  )
    .description('add, remove, clear, enable, disable or merge persistent dirty bitmaps (as qemu-img bitmap)')
    .option('--add', 'add the bitmap (empty)')
    .option('--remove', 'remove the bitmap')
    .option('--clear', 'clear every bit of the bitmap')
    .option('--enable', 'enable the bitmap (writes set its bits)')
    .option('--disable', 'disable the bitmap (its bits stay as they are)')
    .addOption(new Option('--merge <source>', 'set every bit of the bitmap SOURCE in the bitmap'))
    .addOption(
      new Option(
        '-g <granularity>',
        'with --add: bytes one bit covers (default: the cluster size, at least 4k)',
      ),
    )
    .addOption(new Option('-b <source_file>', 'with --merge: the image holding the source bitmap'))
    .addOption(new Option('-F <source_fmt>', 'with -b: its format'))
    .addHelpText(
      'after',
      '\nOperations run in the order given. Exit code 0 on success, 1 on any failure.\n\nExamples:\n  qcow2 bitmap --add -g 64k disk.qcow2 nightly\n  qcow2 bitmap --clear --enable disk.qcow2 nightly\n  qcow2 bitmap --merge weekly disk.qcow2 nightly\n',
    )
    .action(
      async (file: string | undefined, bitmap: string | undefined, options: Record<string, unknown>) => {
        const collected = operations;
        operations = [];
        setExit(
          await bitmapCommand(context, file, bitmap, {
            operations: collected,
            format: options.f as ImageFormat | undefined,
            granularity: options.g as string | undefined,
            sourceFile: options.b as string | undefined,
            sourceFormat: options.F as ImageFormat | undefined,
          }),
        );
      },
    );
  for (const kind of ['add', 'remove', 'clear', 'enable', 'disable'] as const) {
    command.on(`option:${kind}`, () => operations.push({ kind }));
  }
  command.on('option:merge', (source: string) => operations.push({ kind: 'merge', source }));
}
