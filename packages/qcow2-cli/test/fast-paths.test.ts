/**
 * `qcow2 create` and `qcow2 info` without commander: the fast paths must hand the commands exactly
 * what commander's actions hand them, and leave everything unusual to commander. The commands are
 * replaced by spies; each command line runs once as given (fast path) and once behind a leading
 * `--debug` (which only commander parses).
 */
import { beforeEach, describe, expect, test, vi } from 'vitest';
import { createFastPath, infoFastPath } from '../src/commands/fast-paths.js';
import type { CliIo } from '../src/io.js';
import { run } from '../src/run.js';

const calls = vi.hoisted(() => ({ create: [] as unknown[][], info: [] as unknown[][] }));
vi.mock('../src/commands/create.js', () => ({
  createCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.create.push(args);
    return 0;
  },
}));
vi.mock('../src/commands/info.js', () => ({
  infoCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.info.push(args);
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
  calls.create.length = 0;
  calls.info.length = 0;
});

describe('createFastPath and infoFastPath agree with commander', () => {
  test.each([
    [['disk.qcow2', '1P']],
    [['-f', 'qcow2', 'disk.qcow2', '1P']],
    [['-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-o', 'refcount_bits=64,lazy_refcounts=on', 'd', '1T']],
    [['-f', 'raw', '-f', 'qcow2', 'disk', '10G', '-q']],
    [['-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2']],
    [['-u', '-b', 'base', '-F', 'raw', 'o', '1M', '--debug']],
    [['-o', '', 'disk', '0']],
  ])('create %j', async (args) => {
    const fast = createFastPath(args);
    expect(fast).toBeDefined();
    expect(await run(['create', ...args], io)).toBe(0);
    expect(await run(['--debug', 'create', ...args], io)).toBe(0);
    expect(calls.create).toHaveLength(2);
    expect(calls.create[0]).toEqual(calls.create[1]);
    expect(calls.create[0]).toEqual([fast!.file, fast!.size, fast!.options]);
  });

  test.each([
    [['disk.qcow2']],
    [['--output=json', 'disk.qcow2']],
    [['--output', 'human', '-f', 'qcow2', 'disk.qcow2', '-U']],
    [['--backing-chain', '--force-share', '--output=json', '--output=human', 'a']],
    [['-f', 'raw', 'a', '--debug']],
  ])('info %j', async (args) => {
    const fast = infoFastPath(args);
    expect(fast).toBeDefined();
    expect(await run(['info', ...args], io)).toBe(0);
    expect(await run(['--debug', 'info', ...args], io)).toBe(0);
    expect(calls.info).toHaveLength(2);
    expect(calls.info[0]).toEqual(calls.info[1]);
    expect(calls.info[0]).toEqual([fast!.file, fast!.options]);
  });

  test('anything unusual is left to commander', () => {
    for (const args of [
      [],
      ['a', '1M', 'extra'],
      ['-fqcow2', 'a', '1M'],
      ['-qu', 'a', '1M'],
      ['--help'],
      ['-h', 'a'],
      ['-f'],
      ['a', '-o'],
      ['-o', '-x', 'a'],
      ['--', 'a', '1M'],
      ['-U', 'a', '1M'],
      ['--output=json', 'a', '1M'],
      ['--debug=1', 'a'],
      ['-', '1M'],
    ]) {
      expect(createFastPath(args), `create ${args.join(' ')}`).toBeUndefined();
    }
    for (const args of [
      [],
      ['a', 'b'],
      ['--output=xml', 'a'],
      ['--output', 'a'],
      ['--output='],
      ['-f', 'vmdk', 'a'],
      ['-Uf', 'raw', 'a'],
      ['-q', 'a'],
      ['--backing-chain=yes', 'a'],
      ['--help'],
    ]) {
      expect(infoFastPath(args), `info ${args.join(' ')}`).toBeUndefined();
    }
  });

  test('a line the fast path leaves alone still reaches the command through commander', async () => {
    expect(createFastPath(['-qf', 'qcow2', 'disk', '1M'])).toBeUndefined();
    expect(await run(['create', '-qf', 'qcow2', 'disk', '1M'], io)).toBe(0);
    expect(calls.create).toEqual([
      ['disk', '1M', expect.objectContaining({ format: 'qcow2', quiet: true, options: [] })],
    ]);
  });
});
