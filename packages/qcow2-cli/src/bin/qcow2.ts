#!/usr/bin/env node
/** The `qcow2` executable: with bin/process-io.ts, the only code that touches `process`. */
import { run } from '../run.js';
import { exitWith, processIo } from './process-io.js';

// No top-level await: the bundle is a CommonJS file (see scripts/bundle-bin.mjs --code-cache).
void run(process.argv.slice(2), processIo()).then(exitWith);
