/**
 * Command-line parsing for `qcow2-nbd`, with qemu-nbd's flags. Pure: argv in, options out.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { CliError } from './errors.js';

export type ImageFormat = 'raw' | 'qcow2' | 'qcow';

export interface ExportSpec {
  readonly name: string;
  readonly path: string;
}

export interface CliOptions {
  readonly exports: readonly ExportSpec[];
  readonly port: number;
  readonly bind: string;
  readonly socket: string | undefined;
  readonly description: string | undefined;
  readonly readOnly: boolean;
  readonly format: ImageFormat | undefined;
  readonly persistent: boolean;
  /** Connections at once; 0 = unlimited. */
  readonly shared: number;
  readonly snapshot: boolean;
  readonly loadSnapshot: string | undefined;
  readonly discard: 'ignore' | 'unmap';
  /**
   * File I/O: `threads` (the default when undefined) through libuv's pool; `sync` small requests
   * (at most 64 KiB) on the main thread; `auto` as `sync` on tmpfs/ramfs, the pool elsewhere.
   */
  readonly aio: 'threads' | 'sync' | 'auto' | undefined;
  /** Connections served on threads of their own at once (0: none). */
  readonly connectionThreads: number;
  readonly allocationDepth: boolean;
  /** Persistent dirty bitmaps to export as `qemu:dirty-bitmap:NAME` (-B, as given). */
  readonly bitmaps: readonly string[];
  readonly pidFile: string | undefined;
  readonly tlsCreds: string | undefined;
  readonly verbose: boolean;
}

/** Result of parsing: options to run with, or text to print (help, version) and exit 0. */
export type ParseResult =
  | { readonly kind: 'run'; readonly options: CliOptions }
  | { readonly kind: 'print'; readonly text: string };

function integer(min: number, max: number) {
  return (value: string): number => {
    if (!/^\d+$/.test(value)) throw new InvalidArgumentError('not a whole number');
    const parsed = Number(value);
    if (parsed < min || parsed > max) throw new InvalidArgumentError(`must be between ${min} and ${max}`);
    return parsed;
  };
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function parseArgs(argv: readonly string[], version: string): ParseResult {
  let printed = '';
  const program = new Command('qcow2-nbd')
    .description('Serve qcow2 and raw images over NBD (flags as qemu-nbd).')
    .argument(
      '[FILE...]',
      'images to serve; several files become several exports named after their file names',
    )
    .option('-p, --port <PORT>', 'TCP port to listen on', integer(0, 65535), 10809)
    .option('-b, --bind <ADDR>', 'address to listen on', '127.0.0.1')
    .option('-k, --socket <PATH>', 'listen on a unix socket instead of TCP')
    .option('-x, --export-name <NAME>', 'export name (default: empty)')
    .option('-D, --description <TEXT>', 'export description')
    .option('--export <NAME=FILE>', 'serve FILE as export NAME (repeatable)', collect, [] as string[])
    .option('-r, --read-only', 'export read-only', false)
    .addOption(
      new Option('-f, --format <FORMAT>', 'image format (default: probed)').choices(['raw', 'qcow2', 'qcow']),
    )
    .option('-t, --persistent', 'keep serving after the last client disconnects', false)
    .option('-e, --shared <NUM>', 'clients served at once (0: unlimited)', integer(0, 65535), 1)
    .option('-s, --snapshot', 'writes go to a throw-away overlay in memory', false)
    .option(
      '-l, --load-snapshot <SNAPSHOT>',
      'serve an internal snapshot read-only (ID, NAME, or snapshot.id=..,snapshot.name=..)',
    )
    .addOption(
      new Option('--discard <MODE>', 'what TRIM does').choices(['ignore', 'unmap']).default('ignore'),
    )
    .addOption(
      new Option(
        '--aio <MODE>',
        'file I/O: auto (default: sync on tmpfs/ramfs, else threads), threads (pool) or sync (requests up to 64 KiB inline)',
      ).choices(['auto', 'threads', 'sync']),
    )
    .option(
      '--connection-threads <NUM>',
      'serve connections to raw files on tmpfs on threads of their own, at most NUM at once (0: all on the event loop)',
      integer(0, 1024),
      16,
    )
    .option('-A, --allocation-depth', 'offer the qemu:allocation-depth meta context', false)
    .option(
      '-B, --bitmap <NAME>',
      'offer persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME meta context (repeatable)',
      collect,
      [] as string[],
    )
    .option('--pid-file <PATH>', 'write the process id to PATH')
    .option('--tls-creds <DIR>', 'require TLS with ca-cert.pem, server-cert.pem and server-key.pem from DIR')
    .option('-v, --verbose', 'log connection events to stderr', false)
    .version(version, '-V, --version')
    .helpOption('-h, --help')
    .exitOverride()
    .configureOutput({
      writeOut: (text) => {
        printed += text;
      },
      writeErr: () => {},
    });
  try {
    program.parse(argv as string[], { from: 'user' });
  } catch (error) {
    if (error instanceof CommanderError) {
      if (error.code === 'commander.helpDisplayed' || error.code === 'commander.version') {
        return { kind: 'print', text: printed };
      }
      throw new CliError(error.message.replace(/^error: /, ''));
    }
    throw error;
  }
  const raw = program.opts<{
    port: number;
    bind: string;
    socket?: string;
    exportName?: string;
    description?: string;
    export: string[];
    readOnly: boolean;
    format?: ImageFormat;
    persistent: boolean;
    shared: number;
    snapshot: boolean;
    loadSnapshot?: string;
    discard: 'ignore' | 'unmap';
    aio?: 'threads' | 'sync' | 'auto';
    connectionThreads: number;
    allocationDepth: boolean;
    bitmap: string[];
    pidFile?: string;
    tlsCreds?: string;
    verbose: boolean;
  }>();
  const files = program.args;
  const exports: ExportSpec[] = [];
  if (files.length === 1) {
    exports.push({ name: raw.exportName ?? '', path: files[0]! });
  } else {
    if (raw.exportName !== undefined && files.length > 1) {
      throw new CliError('-x/--export-name names a single FILE; use --export NAME=FILE for several');
    }
    for (const path of files) exports.push({ name: baseName(path), path });
  }
  for (const spec of raw.export) {
    const at = spec.indexOf('=');
    if (at < 0) throw new CliError(`--export ${spec}: expected NAME=FILE`);
    exports.push({ name: spec.slice(0, at), path: spec.slice(at + 1) });
  }
  if (exports.length === 0) throw new CliError('no image given (qcow2-nbd [OPTIONS] FILE)');
  const names = new Set<string>();
  for (const entry of exports) {
    if (names.has(entry.name)) throw new CliError(`export name '${entry.name}' is used twice`);
    names.add(entry.name);
  }
  if (raw.loadSnapshot !== undefined && !raw.readOnly && !raw.snapshot) {
    throw new CliError('-l/--load-snapshot serves a snapshot read-only: add -r/--read-only');
  }
  return {
    kind: 'run',
    options: {
      exports,
      port: raw.port,
      bind: raw.bind,
      socket: raw.socket,
      description: raw.description,
      readOnly: raw.readOnly,
      format: raw.format,
      persistent: raw.persistent,
      shared: raw.shared,
      snapshot: raw.snapshot,
      loadSnapshot: raw.loadSnapshot,
      discard: raw.discard,
      aio: raw.aio,
      connectionThreads: raw.connectionThreads,
      allocationDepth: raw.allocationDepth,
      bitmaps: raw.bitmap,
      pidFile: raw.pidFile,
      tlsCreds: raw.tlsCreds,
      verbose: raw.verbose,
    },
  };
}

function baseName(path: string): string {
  const parts = path.split('/').filter((part) => part !== '');
  return parts[parts.length - 1] ?? path;
}

/** `-l` forms: `ID_OR_NAME`, or `snapshot.id=ID,snapshot.name=NAME` (either part optional). */
export function parseSnapshotSpec(spec: string): { id?: string; name?: string; idOrName?: string } {
  if (!spec.startsWith('snapshot.')) return { idOrName: spec };
  const out: { id?: string; name?: string } = {};
  for (const part of spec.split(',')) {
    const at = part.indexOf('=');
    const key = part.slice(0, at);
    const value = part.slice(at + 1);
    if (key === 'snapshot.id') out.id = value;
    else if (key === 'snapshot.name') out.name = value;
    else throw new CliError(`-l ${spec}: unknown key '${key}'`);
  }
  return out;
}
