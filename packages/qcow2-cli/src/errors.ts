/**
 * Errors the CLI reports, and the one place that turns any error into an exit code and the single
 * line a person sees.
 */
import { isBlockDeviceError } from '@qcowkit/blockdev';

/** A bad command line: unknown flag, bad value, missing argument. Exit 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** A failure with a message ready for the user and an exit code (default 1). */
export class CliError extends Error {
  override name = 'CliError';
  readonly exitCode: number;
  constructor(message: string, options?: { exitCode?: number; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.exitCode = options?.exitCode ?? 1;
  }
}

const SYSTEM_MESSAGES: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EAGAIN: 'Failed to get shared "write" lock',
  EBUSY: 'Device or resource busy',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
};

/** The text after `qcow2: ` for an error: one line, no stack. */
export function describeError(error: unknown): string {
  if (error instanceof CliError || error instanceof UsageError) return oneLine(error.message);
  if (isBlockDeviceError(error)) return oneLine(error.message);
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== undefined && SYSTEM_MESSAGES[code] !== undefined) return SYSTEM_MESSAGES[code];
    return oneLine(error.message);
  }
  return oneLine(String(error));
}

const OPEN_MESSAGES: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EBUSY: 'Failed to get shared "write" lock (is another process using the image? -U opens it anyway)',
};

/** Wraps an error from opening `file` as qemu-img words it: `Could not open 'FILE': why`. */
export function openError(file: string, error: unknown): CliError {
  const code = isBlockDeviceError(error) ? error.code : undefined;
  const why =
    code !== undefined && OPEN_MESSAGES[code] !== undefined ? OPEN_MESSAGES[code] : describeError(error);
  return new CliError(`Could not open '${file}': ${why}`, { cause: error });
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, '; ').trim();
}
