/** The process's side of `CliIo`, shared by the `qcow2` bin's bundles (bin/qcow2.ts and the
 * subcommands built as bundles of their own, such as bin/qcow2-create.ts). */
import { writeSync } from 'node:fs';
import type { CliIo, CliOutput, CommandContext } from '../io.js';
import { reportFailure } from '../run.js';

// A reader that goes away (`qcow2 map ... | head`) ends the command quietly, as SIGPIPE ends
// qemu-img; any other failure of the output streams is one line and exit 1.
function outputFailed(fd: 1 | 2, error: NodeJS.ErrnoException): never {
  if (fd === 2) process.exit(1);
  if (error.code === 'EPIPE') process.exit(0);
  try {
    writeSync(2, `qcow2: cannot write to stdout: ${error.message}\n`);
  } catch {}
  process.exit(1);
}

/** process.stdout and process.stderr, each made on first use: making one loads Node's stream
 * modules (~3 ms a start). */
const streams: { 1?: NodeJS.WriteStream; 2?: NodeJS.WriteStream } = {};
function stream(fd: 1 | 2): NodeJS.WriteStream {
  let made = streams[fd];
  if (made === undefined) {
    made = fd === 1 ? process.stdout : process.stderr;
    made.on('error', (error: NodeJS.ErrnoException) => outputFailed(fd, error));
    streams[fd] = made;
  }
  return made;
}

/**
 * Text goes straight to the file descriptor with blocking writes, in order, as Node's own stdio
 * streams write to files, pipes and terminals on Linux. A descriptor that would block (a
 * non-blocking pipe that is full) hands the rest, and everything after, to the stream; so does a
 * stream made for other reasons (`convert ... -`'s binary output), which may still hold bytes a
 * direct write would overtake.
 */
function textOutput(fd: 1 | 2): CliOutput {
  let streamed = false;
  return {
    write(chunk) {
      if (streamed || streams[fd] !== undefined) {
        streamed = true;
        stream(fd).write(chunk);
        return;
      }
      let bytes = Buffer.from(chunk, 'utf8');
      try {
        while (bytes.length > 0) bytes = bytes.subarray(writeSync(fd, bytes));
      } catch (error) {
        const { code } = error as NodeJS.ErrnoException;
        if (code !== 'EAGAIN' && code !== 'EINTR') outputFailed(fd, error as NodeJS.ErrnoException);
        streamed = true;
        stream(fd).write(bytes);
      }
    },
  };
}

/**
 * The command's I/O: this process's descriptors, folder and environment. `binaryStdout: false`
 * (a command line that writes no image to stdout) leaves `stdoutStream` out: commands that may
 * write there ask for it up front, and making it loads Node's stream and socket modules when
 * stdout is a pipe (~2 ms of a start).
 */
export function processIo({ binaryStdout = true }: { binaryStdout?: boolean } = {}): CliIo {
  return {
    stdout: textOutput(1),
    stderr: textOutput(2),
    get stdoutStream() {
      return binaryStdout ? stream(1) : undefined;
    },
    cwd: process.cwd(),
    env: process.env,
    get isTTY() {
      return process.stderr.isTTY === true;
    },
  };
}

/** Ends the process with `exitCode` once the event loop is done. */
export function exitWith(exitCode: number): void {
  process.exitCode = exitCode;
}

/**
 * What a subcommand's own bundle runs (see scripts/bundle-bin.mjs `--command`): `line`, the
 * command line as its fast path parsed it, or undefined for a line the bundle leaves to the whole
 * CLI. Runs `command` as `run` would (a failure is one line on stderr and its exit code), with `io`
 * (default: `processIo()`); returns whether it declined.
 */
export function runOwnCommand<Line>(
  line: Line | undefined,
  command: (context: CommandContext, line: Line) => Promise<number>,
  io: CliIo = processIo(),
): boolean {
  if (line === undefined) return true;
  // Called from a promise so that what `command` throws before its first await is caught too.
  void Promise.resolve({ io })
    .then((context) => command(context, line))
    .catch((error: unknown) => reportFailure(process.argv.slice(2), io, error))
    .then(exitWith);
  return false;
}
