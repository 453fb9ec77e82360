#!/usr/bin/env node
/** The `qcow2-nbd` executable: the only file that touches `process`. */
import { readFileSync } from 'node:fs';
import { startCli } from '../cli/main.js';

const version = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
const debug = process.env.QCOWKIT_DEBUG !== undefined;

try {
  const started = await startCli({
    argv: process.argv.slice(2),
    env: process.env,
    pid: process.pid,
    stdout: (text) => void process.stdout.write(text),
    stderr: (text) => void process.stderr.write(text),
    version,
  });
  if (typeof started === 'number') {
    process.exitCode = started;
  } else {
    let signals = 0;
    let finished = false;
    // The handlers stay installed until the process exits: a signal arriving while the server is
    // already shutting down by itself (the last client left) must not kill it mid-close.
    const onSignal = () => {
      signals++;
      if (finished) process.exit(process.exitCode ?? 0);
      if (signals > 1) process.exit(1);
      started.stop();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    process.exitCode = await started.done;
    finished = true;
  }
} catch (error) {
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`qcow2-nbd: ${message}\n`);
  if (debug && error instanceof Error && error.stack !== undefined) process.stderr.write(`${error.stack}\n`);
  process.exitCode = 1;
}
