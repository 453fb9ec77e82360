#!/usr/bin/env node
/** The `qcow2` executable: the only file that touches `process`. */
import { run } from '../run.js';

// A reader that goes away (`qcow2 map ... | head`) ends the command quietly, as SIGPIPE ends
// qemu-img; any other failure of the output streams is one line and exit 1.
process.stdout.on('error', (error: NodeJS.ErrnoException) => {
  if (error.code === 'EPIPE') process.exit(0);
  process.stderr.write(`qcow2: cannot write to stdout: ${error.message}\n`);
  process.exit(1);
});
process.stderr.on('error', () => process.exit(1));

// No top-level await: the bundle is a CommonJS file (see scripts/bundle-bin.mjs --code-cache).
void run(process.argv.slice(2), {
  stdout: { write: (chunk) => void process.stdout.write(chunk) },
  stderr: { write: (chunk) => void process.stderr.write(chunk) },
  stdoutStream: process.stdout,
  cwd: process.cwd(),
  env: process.env,
  isTTY: process.stderr.isTTY === true,
}).then((exitCode) => {
  process.exitCode = exitCode;
});
