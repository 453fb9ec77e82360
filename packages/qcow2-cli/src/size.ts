/**
 * Sizes as qemu-img reads them: a number with an optional suffix, binary multiples.
 * `b`/`B` bytes, `k`/`K` KiB, `M` MiB, `G` GiB, `T` TiB, `P` PiB, `E` EiB (either case).
 * A fraction is allowed with a suffix larger than bytes (`1.5G`), as in QEMU.
 */
import { UsageError } from './errors.js';

const UNITS: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/** QEMU's size syntax: leading blanks and a `+`, then hexadecimal (`0x1000`) or decimal with an
 * optional fraction, then at most a suffix, nothing after it. */
const SIZE_SYNTAX = /^\s*\+?(?:0x([0-9a-f]+)|(\d+)(?:\.(\d+))?)([bkmgtpe])?$/i;

/**
 * The byte count `text` names, exactly, as a bigint (any size, 2^64 and beyond included); undefined
 * when it is not a size, 'fraction' when it is a fraction of a byte (`1.5`: refused by QEMU).
 */
export function sizeInBytes(text: string): bigint | 'fraction' | undefined {
  const match = SIZE_SYNTAX.exec(text);
  if (match === null) return undefined;
  const [, hex, whole, fraction, suffix] = match;
  const unit = UNITS[(suffix ?? 'b').toLowerCase()]!;
  if (fraction !== undefined && unit === 1 && /[1-9]/.test(fraction)) return 'fraction';
  if (hex !== undefined) return BigInt(`0x${hex}`) * BigInt(unit);
  if (fraction === undefined || !/[1-9]/.test(fraction)) return BigInt(whole!) * BigInt(unit);
  // A fraction with a suffix: whole bytes of it, as QEMU truncates.
  return BigInt(whole!) * BigInt(unit) + BigInt(Math.floor(Number(`0.${fraction}`) * unit));
}

/** Parses `text` into a byte count; throws a {@link UsageError} naming `what` when it is not one. */
export function parseSize(text: string, what = 'size'): number {
  const bytes = sizeInBytes(text);
  if (bytes === undefined) {
    throw new UsageError(
      `Invalid ${what} specified: '${text}' (use a number with an optional suffix k, M, G, T, P, E)`,
    );
  }
  if (bytes === 'fraction') {
    throw new UsageError(
      `Invalid ${what} specified: '${text}' (a fraction needs a suffix larger than bytes)`,
    );
  }
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(`Invalid ${what} specified: '${text}' is too large`);
  }
  return Number(bytes);
}

/** A size the way QEMU prints it for people: `64 MiB`, `1.32 MiB`, `512 B` (`%0.3g` of the value in
 * the largest binary unit that keeps it under 1000). */
export function formatHumanSize(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  const scaled = bytes / (1000 / 1024);
  const unitIndex = scaled < 1 ? 0 : Math.min(Math.floor(Math.log2(scaled) / 10), suffixes.length - 1);
  const value = bytes / 2 ** (unitIndex * 10);
  return `${formatG3(value)} ${suffixes[unitIndex]}B`;
}

/** C's `%0.3g` for values below 1000: three significant digits, trailing zeros dropped. */
function formatG3(value: number): string {
  if (value === 0) return '0';
  return String(Number(value.toPrecision(3)));
}
