/**
 * The image formats the CLI names on its command lines (`-f`, `-F`, `-O`). A module of its own, with
 * no imports, so parsing a command line does not load the engine (start-up time: `engine.ts` pulls
 * in `@qcowkit/qcow2-core/node`).
 */
export type ImageFormat = 'qcow2' | 'qcow' | 'raw';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['qcow2', 'qcow', 'raw'];
