/**
 * Presenting a check result as qemu-img check does: its JSON object (same keys, same key order,
 * zero-valued optional fields left out), its human summary, and its exit code.
 */
import type { Qcow2CheckResult } from './types.js';

/**
 * qemu-img check's `--output=json` object. `check-errors`, `filename` and `format` are always
 * there; the counters only when not zero.
 */
export function checkResultToQemuJson(
  result: Qcow2CheckResult,
  names: { filename: string; format?: string },
): Record<string, string | number> {
  const json: Record<string, string | number> = {};
  if (result.imageEndOffset !== 0) json['image-end-offset'] = result.imageEndOffset;
  if (result.compressedClusters !== 0) json['compressed-clusters'] = result.compressedClusters;
  if (result.totalClusters !== 0) json['total-clusters'] = result.totalClusters;
  if (result.corruptions !== 0) json.corruptions = result.corruptions;
  if (result.corruptionsFixed !== 0) json['corruptions-fixed'] = result.corruptionsFixed;
  json['check-errors'] = result.checkErrors;
  if (result.leaks !== 0) json.leaks = result.leaks;
  if (result.leaksFixed !== 0) json['leaks-fixed'] = result.leaksFixed;
  if (result.allocatedClusters !== 0) json['allocated-clusters'] = result.allocatedClusters;
  json.filename = names.filename;
  json.format = names.format ?? 'qcow2';
  if (result.fragmentedClusters !== 0) json['fragmented-clusters'] = result.fragmentedClusters;
  return json;
}

/** C's `%0.2f`: two decimals, an exact tie rounded to even (JS's toFixed rounds ties up). */
export function formatPercent(value: number): string {
  const exact = value.toFixed(20);
  const tie = /^(-?\d+\.\d\d)5(0*)$/.exec(exact);
  if (tie === null) return value.toFixed(2);
  const lastDigit = Number(tie[1]!.at(-1));
  if (lastDigit % 2 === 0) return tie[1]!;
  return (Number(tie[1]) + 0.01 * Math.sign(value || 1)).toFixed(2);
}

/** qemu-img check's human summary (what it prints on stdout after the finding lines), with
 * check -r's account of the repair first when something was fixed. */
export function formatCheckResultHuman(result: Qcow2CheckResult): string {
  const lines: string[] = [];
  if (result.leaksFixed !== 0 || result.corruptionsFixed !== 0) {
    // After a repair (check -r), qemu-img says what it fixed before the state it double-checked.
    lines.push(
      'The following inconsistencies were found and repaired:',
      '',
      `    ${result.leaksFixed} leaked clusters`,
      `    ${result.corruptionsFixed} corruptions`,
      '',
      'Double checking the fixed image now...',
    );
  }
  if (result.corruptions === 0 && result.leaks === 0 && result.checkErrors === 0) {
    lines.push('No errors were found on the image.');
  } else {
    if (result.corruptions !== 0) {
      lines.push(
        '',
        `${result.corruptions} errors were found on the image.`,
        'Data may be corrupted, or further writes to the image may corrupt it.',
      );
    }
    if (result.leaks !== 0) {
      lines.push(
        '',
        `${result.leaks} leaked clusters were found on the image.`,
        'This means waste of disk space, but no harm to data.',
      );
    }
    if (result.checkErrors !== 0) {
      lines.push('', `${result.checkErrors} internal errors have occurred during the check.`);
    }
  }
  if (result.totalClusters !== 0 && result.allocatedClusters !== 0) {
    const allocated = formatPercent((result.allocatedClusters * 100) / result.totalClusters);
    const fragmented = formatPercent((result.fragmentedClusters * 100) / result.allocatedClusters);
    const compressed = formatPercent((result.compressedClusters * 100) / result.allocatedClusters);
    lines.push(
      `${result.allocatedClusters}/${result.totalClusters} = ${allocated}% allocated, ` +
        `${fragmented}% fragmented, ${compressed}% compressed clusters`,
    );
  }
  if (result.imageEndOffset !== 0) lines.push(`Image end offset: ${result.imageEndOffset}`);
  return `${lines.join('\n')}\n`;
}

/** qemu-img check's exit code: 1 when parts could not be checked (check errors; also the caller's
 * answer when the check threw), 2 corruptions, 3 leaks only, 0 clean. */
export function checkVerdictExitCode(result: Qcow2CheckResult): 0 | 1 | 2 | 3 {
  if (result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}
