#!/usr/bin/env node
/**
 * `qcow2 convert` as a bundle of its own (scripts/bundle-bin.mjs `--command convert=...`): the stub
 * runs it for `qcow2 convert ...` instead of the whole CLI's bundle, which holds commander and
 * every other command (twice the code to read and to deserialize from the code cache at every
 * start). It runs the plain `-O raw` lines (commands/fast-paths.ts `convertFastPath`) and the plain
 * `-O qcow2` lines (convert-qcow2-line.ts) exactly as `run` runs them; for any other line it only
 * exports `declined`, and the stub then runs the whole CLI's bundle.
 */
import { convertCommand } from '../commands/convert.js';
import { convertToQcow2Command } from '../commands/convert-qcow2.js';
import { convertFastPath } from '../commands/fast-paths.js';
import { convertQcow2Line } from './convert-qcow2-line.js';
import { processIo, runOwnCommand } from './process-io.js';

function plainLine(argv: readonly string[]) {
  if (argv[0] !== 'convert') return undefined;
  const args = argv.slice(1);
  try {
    return convertFastPath(args) ?? convertQcow2Line(args);
  } catch {
    return undefined; // the whole CLI words the error
  }
}

const line = plainLine(process.argv.slice(2));

/** This bundle left the command line to the whole CLI's bundle. */
export const declined = runOwnCommand(
  line,
  (context, { source, target, options }) =>
    options.outputFormat === 'qcow2'
      ? convertToQcow2Command(context, source, target, options)
      : convertCommand(context, source, target, options),
  // Only a line writing the image to stdout needs stdout as a stream.
  processIo({ binaryStdout: line?.target === '-' }),
);
