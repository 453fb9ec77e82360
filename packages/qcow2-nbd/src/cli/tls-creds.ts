/** Loads X.509 credentials from a directory laid out as QEMU's tls-creds-x509 expects. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { NbdTlsOptions } from '../server/server.js';
import { CliError } from './errors.js';

export async function loadTlsCreds(dir: string): Promise<NbdTlsOptions> {
  const read = async (name: string, required: boolean): Promise<Buffer | undefined> => {
    try {
      return await readFile(join(dir, name));
    } catch (error) {
      if (!required && (error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new CliError(`--tls-creds ${dir}: cannot read ${name}: ${(error as Error).message}`);
    }
  };
  const cert = (await read('server-cert.pem', true))!;
  const key = (await read('server-key.pem', true))!;
  const ca = await read('ca-cert.pem', false);
  return ca === undefined ? { cert, key, required: true } : { cert, key, ca, required: true };
}
