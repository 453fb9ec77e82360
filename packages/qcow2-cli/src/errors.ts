/**
 * Errors the CLI reports, and the one place that turns any error into an exit code and the single
 * line a person sees.
 */
import { BlockDeviceError, type BlockErrorCode, isBlockDeviceError } from '@qcowkit/blockdev';

/** A bad command line: unknown flag, bad value, missing argument. Code `EINVAL`, exit 1. */
export class UsageError extends BlockDeviceError {
  override name = 'UsageError';
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/**
 * A failure with a message ready for the user and an exit code (default 1). Its `code` is the
 * wrapped error's when that is a {@link BlockDeviceError}, else the one given (default `EIO`).
 */
export class CliError extends BlockDeviceError {
  override name = 'CliError';
  readonly exitCode: number;
  constructor(message: string, options?: { exitCode?: number; cause?: unknown; code?: BlockErrorCode }) {
    const code = options?.code ?? (isBlockDeviceError(options?.cause) ? options.cause.code : 'EIO');
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
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

/**
 * {@link describeError} for an error about the image `file` (as the user named it): the engine's
 * `qcow2: file:/abs/path: ` prefix becomes `file: `, so the line names the file once and as given.
 */
export function describeImageError(error: unknown, file: string): string {
  const message = describeError(error);
  const prefix = /^qcow2(?: [a-z]+)?: file:/.exec(message);
  if (prefix === null) return message;
  const end = message.indexOf(': ', prefix[0].length);
  return end === -1 ? message : `${file}: ${message.slice(end + 2)}`;
}

const OPEN_MESSAGES: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EBUSY: 'Failed to get shared "write" lock (is another process using the image? -U opens it anyway)',
};

/**
 * Wraps an error from opening `file` as qemu-img words it: `Could not open 'FILE': why`. When the
 * error concerns the file itself (its message names `path`), the system's short wording is used;
 * an error about another file of the chain (a backing or data file) keeps the message naming it.
 */
export function openError(file: string, error: unknown, path?: string): CliError {
  const code = isBlockDeviceError(error) ? error.code : undefined;
  const aboutThisFile = path === undefined || !(error instanceof Error) || error.message.includes(path);
  const why =
    code !== undefined && OPEN_MESSAGES[code] !== undefined && aboutThisFile
      ? OPEN_MESSAGES[code]
      : describeError(error);
  return new CliError(`Could not open '${file}': ${why}`, { cause: error });
}

/** The stack of `error` and of every `cause` under it, for `--debug`. */
export function debugTrace(error: unknown): string {
  const parts: string[] = [];
  let current: unknown = error;
  for (let depth = 0; current !== undefined && depth < 8; depth++) {
    parts.push(current instanceof Error ? (current.stack ?? String(current)) : String(current));
    current = current instanceof Error ? current.cause : undefined;
  }
  return parts.join('\nCaused by: ');
}

function oneLine(text: string): string {
  // Bytes a damaged image supplies (a format or file name) may hold control characters: shown
  // escaped, so the message stays one printable line.
  return (
    text
      .replace(/\s*\n\s*/g, '; ')
      .trim()
      // biome-ignore lint/suspicious/noControlCharactersInRegex: the point is to find them
      .replace(/[\u0000-\u001f\u007f]/g, (char) => `\\x${char.charCodeAt(0).toString(16).padStart(2, '0')}`)
  );
}
