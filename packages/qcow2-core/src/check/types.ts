/**
 * The result and options of a qcow2 consistency check. The result carries `qemu-img check`'s JSON
 * fields, camelCased, with the same meaning and the same counting rules.
 */

export interface Qcow2CheckResult {
  /** Guest clusters: ceil(virtual size rounded up to 512 / cluster size). */
  totalClusters: number;
  /** Guest clusters the active L1/L2 tables map to host storage (normal, allocated zero, compressed). */
  allocatedClusters: number;
  /** Allocated clusters not following their predecessor in the same L2 table; every compressed one. */
  fragmentedClusters: number;
  compressedClusters: number;
  /** One past the last host cluster that is referenced or has a stored refcount, in bytes. */
  imageEndOffset: number;
  /** Refcounts lower than the references, COPIED flags wrong, broken entries. */
  corruptions: number;
  /** Refcounts higher than the references (space wasted, data safe). */
  leaks: number;
  /** Things the check could not examine (unreadable refcounts). */
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** One line per finding, worded as qemu-img check prints them. */
  messages: string[];
}

export interface Qcow2CheckOptions {
  /** Repair as `qemu-img check -r`: `leaks` frees leaked clusters; `all` also fixes refcounts
   * too low and COPIED flags, rebuilding the refcount structures when needed. Needs a writable
   * file. The result is the state after the repair, with leaksFixed / corruptionsFixed. */
  repair?: 'leaks' | 'all';
  signal?: AbortSignal;
  /** Called between chunks of work with units done and total units (both grow monotonically). */
  onProgress?: (done: number, total: number) => void;
}
