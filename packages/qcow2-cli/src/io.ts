/** What a command may touch of the outside world; `bin/qcow2.ts` fills it from `process`. */
export interface CliOutput {
  write(chunk: string): void;
}

export interface CliIo {
  readonly stdout: CliOutput;
  readonly stderr: CliOutput;
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
