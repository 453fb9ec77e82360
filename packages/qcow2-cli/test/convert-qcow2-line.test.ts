/**
 * convert's own bundle (bin/qcow2-convert.ts) reads plain `-O qcow2` lines itself
 * (bin/convert-qcow2-line.ts): what it hands `convertToQcow2Command` must be what commander's
 * convert action hands it, and every other line must be left to commander. The command is
 * replaced by a spy; commander runs each line behind a leading `--debug` (which no fast path takes).
 */
import { beforeEach, describe, expect, test, vi } from 'vitest';
import { convertQcow2Line } from '../src/bin/convert-qcow2-line.js';
import type { CliIo } from '../src/io.js';
import { run } from '../src/run.js';

const calls = vi.hoisted(() => [] as unknown[][]);
vi.mock('../src/commands/convert-qcow2.js', () => ({
  convertToQcow2Command: async (_context: unknown, ...args: unknown[]) => {
    calls.push(args);
    return 0;
  },
}));

const io: CliIo = {
  stdout: { write: () => {} },
  stderr: { write: () => {} },
  cwd: '/',
  env: {},
  isTTY: false,
};

beforeEach(() => {
  calls.length = 0;
});

describe('convert -O qcow2 lines read without commander', () => {
  test.each([
    [['-f', 'raw', '-O', 'qcow2', 'a.raw', 'b.qcow2']],
    [['-O', 'qcow2', '-c', '-o', 'compression_type=zstd', '-o', 'cluster_size=2M', 'a', 'b']],
    [['-p', '-q', '-U', '-O', 'raw', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'a', '-']],
    [['-n', '--target-is-zero', '-O', 'qcow2', '-m', '8', '-W', '-S', '64k', 'a', 'b']],
    [['--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', '-l', 'snapshot.name=s1', 'a', 'b', '--debug']],
    [['--force-share', '-s', '2', '-O', 'qcow2', '-m', '0x10', '-p', 'a', 'b']],
    [['-O', 'qcow2', '-l', '3', '-f', 'qcow', '-c', '-', 'b']],
    [['-t', 'writeback', '-T', 'none', '-O', 'qcow2', 'a', 'b']],
    [['-T', 'off', '-t', 'unsafe', '-t', 'directsync', '-O', 'qcow2', '-n', 'a', '-']],
  ])('%j: as commander hands it', async (args) => {
    const line = convertQcow2Line(args);
    expect(line).toBeDefined();
    expect(await run(['--debug', 'convert', ...args], io)).toBe(0);
    expect(calls).toEqual([[line!.source, line!.target, line!.options]]);
  });

  test.each([
    [['a', 'b']],
    [['-O', 'raw', 'a', 'b']],
    [['-O', 'qcow2', '-O', 'raw', 'a', 'b']],
    [['-O', 'vmdk', 'a', 'b']],
    [['-Oqcow2', 'a', 'b']],
    [['-O', 'qcow2', 'a']],
    [['-O', 'qcow2', 'a', 'b', 'c']],
    [['-O', 'qcow2', '-f', 'vmdk', 'a', 'b']],
    [['-O', 'qcow2', '-m', '0', 'a', 'b']],
    [['-O', 'qcow2', '-m', '1.5', 'a', 'b']],
    [['-O', 'qcow2', '-S', '1000', 'a', 'b']],
    [['-O', 'qcow2', '--target-is-zero', 'a', 'b']],
    [['-O', 'qcow2', '--skip-broken-bitmaps', 'a', 'b']],
    [['-O', 'qcow2', '-B', '-x', 'a', 'b']],
    [['-O', 'qcow2', '--help']],
    [['-O', 'qcow2', '-cp', 'a', 'b']],
    [['-O', 'qcow2', '--', 'a', 'b']],
    [['-O', 'qcow2', '--bitmaps=yes', 'a', 'b']],
    [['-O', 'qcow2', '-t', 'bogus', 'a', 'b']],
    [['-O', 'qcow2', '-T', 'direct', 'a', 'b']],
    [['-O', 'qcow2', '-W5', 'a', 'b']],
    // Options the plain lines do not take: copy offloading, a rate limit, salvaging.
    [['-O', 'qcow2', '-C', 'a', 'b']],
    [['-O', 'qcow2', '-r', '1M', 'a', 'b']],
    [['-O', 'qcow2', '--salvage', 'a', 'b']],
  ])('%j is left to commander', (args) => {
    expect(convertQcow2Line(args)).toBeUndefined();
  });

  test('-t reaches the command as given, -T does not', () => {
    expect(convertQcow2Line(['-O', 'qcow2', '-t', 'none', '-T', 'writeback', 'a', 'b'])?.options.cache).toBe(
      'none',
    );
    expect(convertQcow2Line(['-O', 'qcow2', '-T', 'none', 'a', 'b'])?.options).not.toHaveProperty('cache');
  });

  test('-l with -s fails as the action fails', () => {
    expect(() => convertQcow2Line(['-O', 'qcow2', '-l', 'a', '-s', 'b', 'x', 'y'])).toThrow(/together/);
  });
});
