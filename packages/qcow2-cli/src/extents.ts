/**
 * Walks a device's block status from `start` to `end`. Requests start small, so the first data can
 * be read while later lookups are still to come, and double while the device reports only zeros, so
 * an 8 TiB guest holding 2 MiB takes a handful of calls instead of one per step. The next lookup
 * is already under way while the caller works through the current batch.
 *
 * `walkExtentBatches` hands out each lookup's extents at once (convert's copy loop plans its reads
 * a batch at a time: one step of an async generator per extent cost more than the planning).
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';
import { CliError } from './errors.js';

const FIRST_STEP = 64 * 2 ** 20;

export async function* walkExtents(device: BlockDevice, start: number, end: number): AsyncGenerator<Extent> {
  for await (const extents of walkExtentBatches(device, start, end)) yield* extents;
}

/** The extents of `walkExtents`, one non-empty array per block-status lookup, in guest order. */
export async function* walkExtentBatches(
  device: BlockDevice,
  start: number,
  end: number,
): AsyncGenerator<readonly Extent[]> {
  let position = start;
  let step = FIRST_STEP;
  const lookup = (at: number, length: number) => {
    const promise = device.blockStatus(at, length);
    // Handled where it is awaited; this only keeps an abandoned prefetch from being reported.
    promise.catch(() => undefined);
    return promise;
  };
  let pending = position < end ? lookup(position, Math.min(end - position, step)) : undefined;
  while (pending !== undefined) {
    const extents = await pending;
    if (extents.length === 0) {
      throw new CliError(`${device.description}: block status returned no extent at offset ${position}`);
    }
    let batchEnd = position;
    let sawData = false;
    for (const extent of extents) {
      if (extent.offset !== batchEnd || extent.length <= 0 || extent.offset + extent.length > end) {
        throw new CliError(`${device.description}: block status returned a bad extent at offset ${batchEnd}`);
      }
      if (!extent.zero) sawData = true;
      batchEnd += extent.length;
    }
    step = sawData ? FIRST_STEP : Math.min(step * 2, Number.MAX_SAFE_INTEGER);
    pending = batchEnd < end ? lookup(batchEnd, Math.min(end - batchEnd, step)) : undefined;
    yield extents;
    position = batchEnd;
  }
}
