/**
 * Somewhere to keep compressed clusters between the scan pass and the writing pass when they do
 * not fit the memory budget, so nothing is compressed twice. Append-only, read back in order.
 * The node entry offers a temporary file (`createFileSpool`); without a spool the writing pass
 * compresses again what memory did not hold.
 */
export interface Spool {
  /** Appends `bytes` (the spool may keep a reference until its next flush). */
  append(bytes: Uint8Array): Promise<void>;
  /** Reads `length` bytes at `offset` (after every append has been made). */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Releases the storage. */
  close(): Promise<void>;
}
