#!/usr/bin/env node
/**
 * `qcow2 info` as a bundle of its own (scripts/bundle-bin.mjs `--command info=...`): the stub runs
 * it for `qcow2 info ...` instead of the whole CLI's bundle, which is twice the code to read and to
 * deserialize from the code cache at every start. Plain command lines (commands/fast-paths.ts) run
 * from here exactly as `run` runs them; for any other line it only exports `declined`, and the stub
 * then runs the whole CLI's bundle. bin/qcow2-check.ts, -map.ts and -snapshot.ts do the same for
 * their subcommands, bin/qcow2-create.ts for plain creates.
 */
import { infoFastPath } from '../commands/fast-paths.js';
import { infoCommand } from '../commands/info.js';
import { runOwnCommand } from './process-io.js';

const argv = process.argv.slice(2);

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(
  argv[0] === 'info' ? infoFastPath(argv.slice(1)) : undefined,
  (context, line) => infoCommand(context, line.file, line.options),
);
