/** File name helpers that follow QEMU's rules rather than Node's normalising ones. */
import { isAbsolute, resolve } from 'node:path';

/** `name` as QEMU combines a backing file name with the overlay's name: the overlay's folder
 * prefix (up to its last `/`) then `name`, unless `name` is absolute. No normalisation. */
export function pathCombine(baseName: string, name: string): string {
  if (name.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(name)) return name;
  const slash = baseName.lastIndexOf('/');
  return slash < 0 ? name : `${baseName.slice(0, slash + 1)}${name}`;
}

/** `name` as an absolute path against the CLI's working folder. */
export function resolveAgainst(cwd: string, name: string): string {
  return isAbsolute(name) ? name : resolve(cwd, name);
}
