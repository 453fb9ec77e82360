import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, test } from 'vitest';
import { type BenchOptions, runRequests, validateBenchOptions } from '../src/commands/bench.js';
import { parseDdOperands } from '../src/commands/dd.js';
import { benchSizeParser, integerParser } from '../src/commands/register-ops.js';

describe('dd operands', () => {
  test('defaults and suffixes', () => {
    expect(parseDdOperands(['if=a', 'of=b'])).toEqual({
      input: 'a',
      output: 'b',
      blockSize: 512,
      count: undefined,
      skip: undefined,
    });
    expect(parseDdOperands(['if=a', 'of=b', 'bs=64k', 'count=2', 'skip=1k'])).toMatchObject({
      blockSize: 65536,
      count: 2,
      skip: 1024,
    });
  });

  test.each([
    [['if=a', 'of=b', 'bs=0'], 'Invalid bs specified. Must be between 1 and 2147483647.'],
    [['if=a', 'of=b', 'bs=2G'], 'Invalid bs specified. Must be between 1 and 2147483647.'],
    [['if=a', 'of=b', 'count=x'], 'Invalid count specified.'],
    [['if=a', 'of=b', 'skip=-1'], 'Invalid skip specified.'],
    [['if=a', 'of=b', 'foo=1'], 'unrecognized operand foo'],
    [['if=a', 'of=b', 'junk'], 'unrecognized operand junk'],
    [['if=a'], 'Must specify both input and output files'],
  ])('%j is refused', (operands, message) => {
    expect(() => parseDdOperands(operands)).toThrow(message);
  });
});

const benchDefaults: BenchOptions = {
  count: 10,
  depth: 4,
  bufferSize: 4096,
  step: 4096,
  offset: 0,
  write: false,
  pattern: 0,
  flushInterval: 0,
  drain: true,
  quiet: true,
  progress: false,
  forceShare: false,
};

describe('bench', () => {
  test('writes walk by step from offset and wrap at the end', async () => {
    const device = new MemoryBlockDevice(16384);
    await runRequests(device, {
      ...benchDefaults,
      write: true,
      pattern: 7,
      count: 5,
      bufferSize: 1024,
      step: 4096,
      offset: 512,
    });
    const bytes = await device.read(0, 16384);
    const written = (offset: number) => bytes.subarray(offset, offset + 1024).every((byte) => byte === 7);
    // 512, 4608, 8704, 12800, then (16896 % 16384) = 512 again.
    for (const offset of [512, 4608, 8704, 12800]) expect(written(offset)).toBe(true);
    expect(bytes[0]).toBe(0);
    expect(bytes[2048]).toBe(0);
  });

  test('flushes every N requests, drained or not', async () => {
    for (const drain of [true, false]) {
      const device = new MemoryBlockDevice(65536);
      let flushes = 0;
      const flush = device.flush.bind(device);
      device.flush = () => {
        flushes++;
        return flush();
      };
      const done: number[] = [];
      await runRequests(device, { ...benchDefaults, write: true, count: 40, flushInterval: 10, drain }, (n) =>
        done.push(n),
      );
      expect(flushes).toBe(4);
      expect(done.at(-1)).toBe(40);
    }
  });

  test.each([
    [{ flushInterval: 10 }, '--flush-interval is only available in write tests'],
    [{ write: true, flushInterval: 2 }, "Flush interval can't be smaller than depth"],
    [{ drain: false }, '--no-drain is only meaningful with --flush-interval'],
    [{ cache: 'fast' }, 'Invalid cache mode'],
    [{ aio: 'posix' }, 'Invalid aio option: posix'],
  ])('%j is refused', (change, message) => {
    expect(() => validateBenchOptions({ ...benchDefaults, ...change })).toThrow(message);
  });

  test('option parsers', () => {
    expect(integerParser(1, 10, 'bad')('7')).toBe(7);
    expect(() => integerParser(1, 10, 'bad')('0')).toThrow('bad');
    expect(() => integerParser(1, 10, 'bad')('x')).toThrow('bad');
    // Numbers as qemu-img reads them (strtol, base 0): hex, octal, a sign, leading white space.
    expect(integerParser(0, 255, 'bad')('0x61')).toBe(97);
    expect(integerParser(0, 255, 'bad')('0X1f')).toBe(31);
    expect(integerParser(0, 255, 'bad')('0141')).toBe(97);
    expect(integerParser(0, 255, 'bad')(' +7')).toBe(7);
    expect(integerParser(0, 255, 'bad')('-0')).toBe(0);
    for (const refused of ['08', '1x', '', '7 ', '0x', '-1', '0x100', '1e3', '1.0']) {
      expect(() => integerParser(0, 255, 'bad')(refused), refused).toThrow('bad');
    }
    expect(benchSizeParser('buffer size')('64k')).toBe(65536);
    expect(() => benchSizeParser('buffer size')('4G')).toThrow('Invalid buffer size specified.');
  });
});
