#!/usr/bin/env node
/** `qcow2 check` as a bundle of its own: plain command lines run from here (see bin/qcow2-info.ts). */
import { checkCommand } from '../commands/check.js';
import { checkFastPath } from '../commands/fast-paths.js';
import { runOwnCommand } from './process-io.js';

const argv = process.argv.slice(2);

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(
  argv[0] === 'check' ? checkFastPath(argv.slice(1)) : undefined,
  (context, line) => checkCommand(context, line.file, line.options),
);
