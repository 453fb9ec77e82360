export { detectFormat, type ImageFormat } from './engine.js';
export { CliError, UsageError } from './errors.js';
export type { CliIo, CliOutput } from './io.js';
export { qdictKeyOrder, toQemuJson } from './output/qemu-json.js';
export { parseSnapshotOption, run, VERSION } from './run.js';
export { formatHumanSize, parseSize } from './size.js';
