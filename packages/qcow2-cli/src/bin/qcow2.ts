#!/usr/bin/env node
/** The `qcow2` executable: the only file that touches `process`. */
import { run } from '../run.js';

const exitCode = await run(process.argv.slice(2), {
  stdout: { write: (chunk) => void process.stdout.write(chunk) },
  stderr: { write: (chunk) => void process.stderr.write(chunk) },
  cwd: process.cwd(),
  env: process.env,
  isTTY: process.stderr.isTTY === true,
});
process.exitCode = exitCode;
