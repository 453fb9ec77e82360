/** What a command may touch of the outside world; `bin/qcow2.ts` fills it from `process`. */
import type { Writable } from 'node:stream';

export interface CliOutput {
  write(chunk: string): void;
}

export interface CliIo {
  readonly stdout: CliOutput;
  readonly stderr: CliOutput;
  /**
   * stdout as a binary stream, for commands that write an image there (`convert ... -`). Write
   * with a callback (or wait for 'drain') before reusing a buffer. Absent where the caller has
   * no such stream (in-process use): those commands then fail with a clear error.
   */
  readonly stdoutStream?: Writable;
  /** Folder that relative file names resolve against. */
  readonly cwd: string;
  readonly env: Readonly<Record<string, string | undefined>>;
  /** stderr is a terminal (progress output may adapt to it). */
  readonly isTTY: boolean;
}

/** Shared by every command. */
export interface CommandContext {
  readonly io: CliIo;
}
