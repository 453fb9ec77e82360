/** qemu-img check's layouts. JSON leaves out counters that are zero, as QEMU does. */
import type { CheckResult } from '../engine.js';
import type { JsonObject } from './qemu-json.js';

/** C's `%0.2f`: like `toFixed(2)` but an exact tie rounds to even (40.625 prints 40.62). */
export function cFixed2(value: number): string {
  const doubled = value * 200;
  if (Number.isInteger(doubled) && Math.abs(doubled % 2) === 1 && doubled / 200 === value) {
    const lower = (doubled - 1) / 2;
    const even = lower % 2 === 0 ? lower : lower + 1;
    return (even / 100).toFixed(2);
  }
  return value.toFixed(2);
}

const ifPositive = (value: number) => (value > 0 ? value : undefined);

export function checkToJson(result: CheckResult, filename: string, format: string): JsonObject {
  return {
    filename,
    format,
    'check-errors': result.checkErrors,
    'image-end-offset': ifPositive(result.imageEndOffset),
    corruptions: ifPositive(result.corruptions),
    leaks: ifPositive(result.leaks),
    'corruptions-fixed': ifPositive(result.corruptionsFixed),
    'leaks-fixed': ifPositive(result.leaksFixed),
    'total-clusters': ifPositive(result.totalClusters),
    'allocated-clusters': ifPositive(result.allocatedClusters),
    'fragmented-clusters': ifPositive(result.fragmentedClusters),
    'compressed-clusters': ifPositive(result.compressedClusters),
  };
}

export function formatCheckHuman(result: CheckResult): string {
  let out = '';
  if (result.corruptions === 0 && result.leaks === 0 && result.checkErrors === 0) {
    out += 'No errors were found on the image.\n';
  } else {
    if (result.corruptions > 0) {
      out += `\n${result.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (result.leaks > 0) {
      out += `\n${result.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (result.checkErrors > 0) {
      out += `\n${result.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (result.totalClusters > 0 && result.allocatedClusters > 0) {
    const allocated = result.allocatedClusters;
    out += `${allocated}/${result.totalClusters} = ${cFixed2((allocated * 100) / result.totalClusters)}% allocated, ${cFixed2((result.fragmentedClusters * 100) / allocated)}% fragmented, ${cFixed2((result.compressedClusters * 100) / allocated)}% compressed clusters\n`;
  }
  if (result.imageEndOffset > 0) out += `Image end offset: ${result.imageEndOffset}\n`;
  return out;
}
