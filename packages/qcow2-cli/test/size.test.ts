import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import { UsageError } from '../src/errors.js';
import { formatHumanSize, parseSize } from '../src/size.js';

describe('parseSize', () => {
  test.each([
    ['0', 0],
    ['512', 512],
    ['512b', 512],
    ['4k', 4096],
    ['4K', 4096],
    ['64M', 64 * 2 ** 20],
    ['1.5G', 1.5 * 2 ** 30],
    ['8T', 8 * 2 ** 40],
    ['2P', 2 * 2 ** 50],
    ['4P', 4 * 2 ** 50],
    // As QEMU reads sizes: hexadecimal, a leading `+` or blanks, a fraction that gives whole bytes.
    ['0x1000', 4096],
    ['0X10', 16],
    ['0x2k', 2048],
    ['+1M', 2 ** 20],
    [' 1M', 2 ** 20],
    ['1.0', 1],
    ['1.0b', 1],
    ['00012', 12],
  ])('%s is %d bytes', (text, bytes) => {
    expect(parseSize(text)).toBe(bytes);
  });

  test.each([
    '',
    'k',
    '-1',
    '12x',
    '1.5',
    '1.5b',
    '1,5G',
    '0x',
    '0x1.8k',
    '1e3',
    '.5k',
    '1 k',
    '1k ',
    '9999999E',
    '1E',
  ])('%s is refused with a usage error', (text) => {
    expect(() => parseSize(text, 'max length')).toThrow(UsageError);
    expect(() => parseSize(text, 'max length')).toThrow(/max length/);
  });

  test('every suffix multiplies by its power of 1024', () => {
    const suffixes = ['b', 'k', 'm', 'g', 't'];
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 4096 }), fc.integer({ min: 0, max: 4 }), (n, power) => {
        expect(parseSize(`${n}${suffixes[power]}`)).toBe(n * 1024 ** power);
        expect(parseSize(`${n}${suffixes[power]!.toUpperCase()}`)).toBe(n * 1024 ** power);
      }),
    );
  });
});

describe('formatHumanSize', () => {
  // Figures printed by qemu-img 7.2 (info "disk size", snapshot "VM SIZE").
  test.each([
    [0, '0 B'],
    [512, '512 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [4096, '4 KiB'],
    [405504, '396 KiB'],
    [1384448, '1.32 MiB'],
    [67108864, '64 MiB'],
    [1000001, '977 KiB'],
    [8 * 2 ** 40, '8 TiB'],
  ])('%d bytes is "%s"', (bytes, text) => {
    expect(formatHumanSize(bytes)).toBe(text);
  });
});
