#!/usr/bin/env node
/** `qcow2 map` as a bundle of its own: plain command lines run from here (see bin/qcow2-info.ts). */
import { mapFastPath } from '../commands/fast-paths.js';
import { mapCommand } from '../commands/map.js';
import { runOwnCommand } from './process-io.js';

const argv = process.argv.slice(2);

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(
  argv[0] === 'map' ? mapFastPath(argv.slice(1)) : undefined,
  (context, line) => mapCommand(context, line.file, line.options),
);
