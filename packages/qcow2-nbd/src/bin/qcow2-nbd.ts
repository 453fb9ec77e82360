#!/usr/bin/env node
/** The `qcow2-nbd` executable: the only file that touches `process`. */
import { readFileSync } from 'node:fs';
import { startCli } from '../cli/main.js';

const version = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
const debug = process.env.QCOWKIT_DEBUG !== undefined;

// Signal handlers go in before anything starts, so a signal can never find the default action
// (which kills the process without the clean stop): one arriving while the server is still
// starting stops it as soon as it is up; a second one exits at once.
let signals = 0;
let finished = false;
let stopServer: (() => void) | undefined;
const onSignal = () => {
  signals++;
  if (finished) process.exit(process.exitCode ?? 0);
  if (signals > 1) process.exit(1);
  stopServer?.();
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

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
    stopServer = started.stop;
    if (signals > 0) started.stop();
    process.exitCode = await started.done;
  }
} catch (error) {
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`qcow2-nbd: ${message}\n`);
  if (debug && error instanceof Error && error.stack !== undefined) process.stderr.write(`${error.stack}\n`);
  process.exitCode = 1;
}
// Everything is closed (images flushed, pid file gone, stdout and stderr written synchronously):
// exit now rather than while Node tears its handles down, when a late signal (a supervisor's
// SIGTERM racing a server that stopped by itself) would meet the default action again.
finished = true;
process.exit(process.exitCode ?? 0);
