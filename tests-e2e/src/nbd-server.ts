/**
 * Starting and stopping the built qcow2-nbd bin from an end-to-end test, and running NBD clients
 * asynchronously (the server under test may live in the same event loop).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { type AddressInfo, connect, createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './tools.js';

/** The built qcow2-nbd bin (run `pnpm build` first). */
export const NBD_BIN = fileURLToPath(
  new URL('../../packages/qcow2-nbd/dist/bin/qcow2-nbd.js', import.meta.url),
);

export interface RunningServer {
  readonly child: ChildProcess;
  readonly uri: string;
  readonly stderr: () => string;
  /** SIGTERM (if still running), then the exit status. */
  stop(): Promise<number | null>;
  /** SIGKILL (if still running), then waits for the exit. */
  kill(): Promise<void>;
}

/** Resolves with the exit status once `child` has exited (at once if it already has). */
export function exited(child: ChildProcess): Promise<number | null> {
  return child.exitCode !== null || child.signalCode !== null
    ? Promise.resolve(child.exitCode)
    : new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

function accepts(port: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const probe = connect(port, '127.0.0.1', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

/**
 * Whether a unix socket is listening at `path`. The file appears at bind(2), a moment before
 * listen(2): a client connecting in between is refused, and one that then waits for data waits
 * forever. Read from /proc/net/unix (the listening flag, __SO_ACCEPTCON) rather than by connecting,
 * which a server without -t would count as its client and stop after.
 */
function unixListening(path: string): boolean {
  if (!existsSync(path)) return false;
  for (const line of readFileSync('/proc/net/unix', 'utf8').split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (
      fields.length >= 8 &&
      fields.slice(7).join(' ') === path &&
      (Number.parseInt(fields[3]!, 16) & 0x10000) !== 0
    ) {
      return true;
    }
  }
  return false;
}

/**
 * Starts the bin on a fresh unix socket in `dir` (or on loopback TCP with `port`) serving `args`,
 * and resolves once it accepts connections. A server that exits or is not up in 20 s fails.
 */
export async function startServer(
  dir: string,
  args: readonly string[],
  options: { port?: number } = {},
): Promise<RunningServer> {
  const socket = join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const where = options.port === undefined ? ['-k', socket] : ['-p', String(options.port)];
  const child = spawn(process.execPath, [NBD_BIN, ...where, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (chunk) => {
    stderr += chunk;
  });
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`qcow2-nbd exited: ${stderr}`);
    const ready = options.port === undefined ? unixListening(socket) : await accepts(options.port);
    if (ready) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`qcow2-nbd did not start: ${stderr}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    child,
    uri: options.port === undefined ? `nbd+unix:///?socket=${socket}` : `nbd://127.0.0.1:${options.port}/`,
    stderr: () => stderr,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      return exit;
    },
    async kill() {
      if (child.exitCode === null) child.kill('SIGKILL');
      await exit;
    },
  };
}

/**
 * QEMU's qemu-nbd (forked, persistent) serving `args` on a fresh unix socket in `dir`, the oracle
 * beside our server. `stop` signals it and waits up to 5 s for it to go, then kills it.
 */
export function startQemuNbd(
  dir: string,
  args: readonly string[],
): { uri: string; stop(signal?: NodeJS.Signals): Promise<void> } {
  const socket = join(dir, `qemu-nbd-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${socket}.pid`;
  run('qemu-nbd', ['--fork', '--pid-file', pidFile, '-t', '-k', socket, ...args]);
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      process.kill(pid, signal);
      for (let i = 0; i < 250; i++) {
        try {
          process.kill(pid, 0);
        } catch {
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      process.kill(pid, 'SIGKILL');
    },
  };
}

/** A command run asynchronously: its exit status, stdout and stderr, never throwing. */
export function runAsync(
  command: string,
  args: readonly string[],
  options: { env?: NodeJS.ProcessEnv } = {},
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: options.env ?? process.env,
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
    });
    child.stderr.on('data', (chunk) => {
      stderr += chunk;
    });
    child.once('exit', (status) => resolve({ status, stdout, stderr }));
  });
}

/**
 * libnbd's nbdsh running the Python `script` with `env` added to the environment, asynchronously;
 * /usr/bin comes first on PATH (nbdsh's Python module lives beside the system Python).
 */
export function runNbdsh(
  script: string,
  env: Record<string, string>,
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return runAsync('nbdsh', ['-c', script], {
    env: { ...process.env, ...env, PATH: `/usr/bin:${process.env.PATH ?? ''}` },
  });
}

/** Runs a command asynchronously, returning stdout; throws with stderr on a non-zero exit. */
export async function must(command: string, args: readonly string[]): Promise<string> {
  const result = await runAsync(command, args);
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

/**
 * fio's nbd engine writing 4 KiB blocks at random from 4 jobs (8 MiB each, 16 MiB apart, depth 16)
 * and verifying them by crc32c; resolves with its report (throws when fio fails).
 */
export function fioVerify(uri: string): Promise<string> {
  return must('fio', [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    '--numjobs=4',
    '--size=8M',
    '--offset_increment=16M',
    '--verify=crc32c',
    '--verify_state_save=0',
    '--group_reporting',
  ]);
}

/** A TCP port free right now on 127.0.0.1 (the kernel picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/**
 * A CA and a server certificate for localhost and 127.0.0.1 in `pki`, valid for a day, as
 * `--tls-creds` reads them (ca-cert.pem, server-cert.pem, server-key.pem); clients trust the CA
 * with `tls-certificates=PKI`.
 */
export function makePki(pki: string): void {
  mkdirSync(pki, { recursive: true });
  const ssl = (args: string[]) => run('openssl', args, { cwd: pki });
  const request = (name: string, key: string, out: string, ...extra: string[]) =>
    ssl([
      'req',
      ...extra,
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      key,
      '-out',
      out,
      '-days',
      '1',
      '-subj',
      `/CN=${name}`,
    ]);
  request('qcowkit test CA', 'ca-key.pem', 'ca-cert.pem', '-x509');
  request('localhost', 'server-key.pem', 'server.csr');
  writeFileSync(
    join(pki, 'ext.cnf'),
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
  );
  ssl([
    'x509',
    '-req',
    '-in',
    'server.csr',
    '-CA',
    'ca-cert.pem',
    '-CAkey',
    'ca-key.pem',
    '-CAcreateserial',
    '-out',
    'server-cert.pem',
    '-days',
    '1',
    '-extfile',
    'ext.cnf',
  ]);
}
