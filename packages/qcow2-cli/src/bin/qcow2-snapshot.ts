#!/usr/bin/env node
/** `qcow2 snapshot` as a bundle of its own: plain command lines run from here (see
 * bin/qcow2-info.ts). */
import { snapshotFastPath } from '../commands/fast-paths.js';
import { snapshotAction, snapshotCommand } from '../commands/snapshot.js';
import { runOwnCommand } from './process-io.js';

const argv = process.argv.slice(2);

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(
  argv[0] === 'snapshot' ? snapshotFastPath(argv.slice(1)) : undefined,
  (context, line) => snapshotCommand(context, line.file, snapshotAction(line.actions), line.options),
);
