#!/usr/bin/env node
/** The `qcow2` executable: the only file that touches `process`. */
import { writeSync } from 'node:fs';
import type { CliOutput } from '../io.js';
import { run } from '../run.js';

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

// No top-level await: the bundle is a CommonJS file (see scripts/bundle-bin.mjs --code-cache).
void run(process.argv.slice(2), {
  stdout: textOutput(1),
  stderr: textOutput(2),
  get stdoutStream() {
    return stream(1);
  },
  cwd: process.cwd(),
  env: process.env,
  get isTTY() {
    return process.stderr.isTTY === true;
  },
}).then((exitCode) => {
  process.exitCode = exitCode;
});
