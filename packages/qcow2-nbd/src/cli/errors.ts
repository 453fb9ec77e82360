/** The CLI's own failure: printed as one line, exit status 1. */
export class CliError extends Error {
  override name = 'CliError';
}
