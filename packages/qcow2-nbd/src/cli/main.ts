/**
 * The `qcow2-nbd` program without `process`: parse flags, open the images, listen (TCP, unix
 * socket or systemd socket activation), and stop gracefully when told or, without -t, after the
 * last client has gone. The bin wires it to argv, signals and the exit code.
 */
import { unlink, writeFile } from 'node:fs/promises';
import { errorMessage } from '../server/nbd-errors.js';
import { createNbdServer, type NbdListenTarget, type NbdServer } from '../server/server.js';
import { CliError } from './errors.js';
import { openExports } from './open-exports.js';
import { type CliOptions, parseArgs } from './options.js';
import { loadTlsCreds } from './tls-creds.js';

export interface CliEnvironment {
  readonly argv: readonly string[];
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly pid: number;
  readonly stdout: (text: string) => void;
  readonly stderr: (text: string) => void;
  readonly version: string;
}

export interface RunningCli {
  /** Resolves with the exit status once the server has stopped. */
  readonly done: Promise<number>;
  /** Graceful stop (first signal). */
  stop(): void;
}

/** Starts the program. Rejects (with a one-line message) when it cannot start. */
export async function startCli(environment: CliEnvironment): Promise<RunningCli | number> {
  const parsed = parseArgs(environment.argv, environment.version);
  if (parsed.kind === 'print') {
    environment.stdout(parsed.text);
    return 0;
  }
  const options = parsed.options;
  const target = listenTarget(options, environment);
  const tls = options.tlsCreds === undefined ? undefined : await loadTlsCreds(options.tlsCreds);
  const opened = await openExports(options);
  const log = options.verbose ? (line: string) => environment.stderr(`qcow2-nbd: ${line}\n`) : undefined;
  let server: NbdServer | undefined;
  let stopping = false;
  let resolveDone!: (status: number) => void;
  const done = new Promise<number>((resolve) => {
    resolveDone = resolve;
  });
  const stop = () => {
    if (stopping) return;
    stopping = true;
    void (async () => {
      await server?.close();
      await opened.close();
      if (options.pidFile !== undefined) await unlink(options.pidFile).catch(() => {});
      resolveDone(0);
    })().catch((error) => {
      environment.stderr(`qcow2-nbd: ${errorMessage(error)}\n`);
      resolveDone(1);
    });
  };
  try {
    server = createNbdServer({
      exports: opened.exports,
      ...(tls === undefined ? {} : { tls }),
      maxConnections: options.shared === 0 ? Number.POSITIVE_INFINITY : options.shared,
      connectionThreads: options.connectionThreads,
      ...(log === undefined ? {} : { log }),
      onDisconnect: ({ open }) => {
        log?.(`client disconnected, ${open} left`);
        if (!options.persistent && open === 0) stop();
      },
    });
    // The pid file exists before the socket does: whoever waits for the socket finds both.
    if (options.pidFile !== undefined) await writeFile(options.pidFile, `${environment.pid}\n`);
    await server.listen(target);
  } catch (error) {
    if (options.pidFile !== undefined) await unlink(options.pidFile).catch(() => {});
    await server?.close().catch(() => {});
    await opened.close();
    throw listenError(error, target);
  }
  return { done, stop };
}

function listenTarget(options: CliOptions, environment: CliEnvironment): NbdListenTarget {
  const fds = environment.env.LISTEN_FDS;
  const pid = environment.env.LISTEN_PID;
  if (fds !== undefined && (pid === undefined || Number(pid) === environment.pid)) {
    if (fds !== '1') throw new CliError(`LISTEN_FDS=${fds}: socket activation needs exactly one socket`);
    return { fd: 3 };
  }
  if (options.socket !== undefined) return { path: options.socket };
  return { port: options.port, host: options.bind };
}

function listenError(error: unknown, target: NbdListenTarget): Error {
  if (error instanceof CliError) return error;
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'EADDRINUSE' || code === 'EACCES' || code === 'EADDRNOTAVAIL' || code === 'EBADF') {
    const where =
      'path' in target ? target.path : 'fd' in target ? `fd ${target.fd}` : `${target.host}:${target.port}`;
    return new CliError(`cannot listen on ${where}: ${code}`);
  }
  return error instanceof Error ? error : new Error(String(error));
}
