#!/usr/bin/env node
/**
 * `qcow2 create` as a bundle of its own (scripts/bundle-bin.mjs `--command create=...`): the stub
 * runs it for `qcow2 create ...` instead of the whole CLI's bundle, which is eight times the code
 * to read and to deserialize from the code cache at every start. It takes the plain command lines
 * that need neither commander (commands/fast-paths.ts) nor the image engine (a backing file to
 * open, metadata preallocation, an external data file: `createNeedsImageEngine`), and runs them
 * exactly as `run` does; for any other line it only exports `declined`, and the stub then runs the
 * whole CLI's bundle.
 */
import { createCommand, createNeedsImageEngine } from '../commands/create.js';
import { createFastPath } from '../commands/fast-paths.js';
import { runOwnCommand } from './process-io.js';

function plainLine(argv: readonly string[]) {
  const line = argv[0] === 'create' ? createFastPath(argv.slice(1)) : undefined;
  try {
    return line !== undefined && !createNeedsImageEngine(line.file, line.options) ? line : undefined;
  } catch {
    return undefined; // the whole CLI words the error
  }
}

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(plainLine(process.argv.slice(2)), (context, line) =>
  createCommand(context, line.file, line.size, line.options),
);
