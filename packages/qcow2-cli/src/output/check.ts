/** qemu-img check's layouts. JSON leaves out counters that are zero, as QEMU does. */
import type { CheckResult } from '../engine.js';
import type { JsonObject } from './qemu-json.js';

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
    out += `${allocated}/${result.totalClusters} = ${((allocated * 100) / result.totalClusters).toFixed(2)}% allocated, ${((result.fragmentedClusters * 100) / allocated).toFixed(2)}% fragmented, ${((result.compressedClusters * 100) / allocated).toFixed(2)}% compressed clusters\n`;
  }
  if (result.imageEndOffset > 0) out += `Image end offset: ${result.imageEndOffset}\n`;
  return out;
}
