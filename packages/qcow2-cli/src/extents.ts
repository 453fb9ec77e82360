/**
 * Walks a device's block status from `start` to `end`. Requests start small, so the first data can
 * be read while later lookups are still to come, and double while the device reports only zeros, so
 * an 8 TiB guest holding 2 MiB takes a handful of calls instead of one per step.
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';
import { CliError } from './errors.js';

const FIRST_STEP = 64 * 2 ** 20;

export async function* walkExtents(device: BlockDevice, start: number, end: number): AsyncGenerator<Extent> {
  let position = start;
  let step = FIRST_STEP;
  while (position < end) {
    const extents = await device.blockStatus(position, Math.min(end - position, step));
    if (extents.length === 0) {
      throw new CliError(`${device.description}: block status returned no extent at offset ${position}`);
    }
    let sawData = false;
    for (const extent of extents) {
      if (extent.offset !== position || extent.length <= 0 || extent.offset + extent.length > end) {
        throw new CliError(`${device.description}: block status returned a bad extent at offset ${position}`);
      }
      if (!extent.zero) sawData = true;
      position += extent.length;
      yield extent;
    }
    step = sawData ? FIRST_STEP : Math.min(step * 2, Number.MAX_SAFE_INTEGER);
  }
}
