/**
 * `qcow2 convert`, `create`, `info`, `check`, `map` and `snapshot` without commander: the fast paths must hand
 * the commands exactly what commander's actions hand them, and leave everything unusual to
 * commander. The commands are replaced by spies; each command line runs once as given (fast path)
 * and once behind a leading `--debug` (which only commander parses).
 */
import { beforeEach, describe, expect, test, vi } from 'vitest';
import {
  checkFastPath,
  convertFastPath,
  createFastPath,
  infoFastPath,
  mapFastPath,
  snapshotFastPath,
} from '../src/commands/fast-paths.js';
import type { CliIo } from '../src/io.js';
import { run } from '../src/run.js';

const calls = vi.hoisted(() => ({
  convert: [] as unknown[][],
  create: [] as unknown[][],
  info: [] as unknown[][],
  check: [] as unknown[][],
  map: [] as unknown[][],
  snapshot: [] as unknown[][],
}));
vi.mock('../src/commands/convert.js', () => ({
  convertCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.convert.push(args);
    return 0;
  },
}));
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
vi.mock('../src/commands/check.js', () => ({
  checkCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.check.push(args);
    return 0;
  },
}));
vi.mock('../src/commands/map.js', () => ({
  mapCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.map.push(args);
    return 0;
  },
}));
vi.mock('../src/commands/snapshot.js', async (importActual) => ({
  // The real snapshotAction: it turns commander's options object into the action.
  ...(await importActual<typeof import('../src/commands/snapshot.js')>()),
  snapshotCommand: async (_context: unknown, ...args: unknown[]) => {
    calls.snapshot.push(args);
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
  for (const list of Object.values(calls)) list.length = 0;
});

/** Runs `command ...args` through the fast path and through commander; both calls must agree. */
async function bothWays(command: keyof typeof calls, args: string[]): Promise<unknown[]> {
  expect(await run([command, ...args], io)).toBe(0);
  expect(await run(['--debug', command, ...args], io)).toBe(0);
  expect(calls[command]).toHaveLength(2);
  expect(calls[command][0]).toEqual(calls[command][1]);
  return calls[command][0]!;
}

describe('the fast paths agree with commander', () => {
  test.each([
    [['-f', 'qcow2', '-O', 'raw', 'a.qcow2', 'b.raw']],
    [['a.qcow2', '-']],
    [['-p', '-U', 'a', '-l', 'snapshot.name=s1', 'b', '--debug']],
    [['-p', '-q', '--force-share', '-s', '2', 'a', 'b']],
    [['-n', '-S', '64k', '-O', 'raw', '-O', 'raw', 'a', 'b']],
    [['-S', '0', '-l', '3', '-f', 'raw', 'a', 'b']],
    [['-t', 'none', '-T', 'writeback', 'a', 'b']],
    [['-t', 'unsafe', '-t', 'writethrough', '-n', 'a', 'b']],
    [['-T', 'off', '-t', 'off', 'a', '-']],
    [['-t', 'directsync', '-S', '0', 'a', 'b']],
  ])('convert %j', async (args) => {
    const fast = convertFastPath(args);
    expect(fast).toBeDefined();
    expect(await bothWays('convert', args)).toEqual([fast!.source, fast!.target, fast!.options]);
  });

  test('convert: -l with -s fails the same way on both paths', async () => {
    const err: string[] = [];
    const failing: CliIo = { ...io, stderr: { write: (chunk) => void err.push(chunk) } };
    const args = ['convert', '-l', 'a', '-s', 'b', 'x', 'y'];
    expect(() => convertFastPath(args.slice(1))).toThrow(/together/);
    expect(await run(args, failing)).toBe(1);
    expect(await run(['--debug', ...args], failing)).toBe(1);
    expect(err.filter((line) => line.startsWith('qcow2:'))).toEqual([
      'qcow2: -l and -s cannot be used together\n',
      'qcow2: -l and -s cannot be used together\n',
    ]);
    expect(calls.convert).toHaveLength(0);
  });

  test.each([
    [['-t', 'bogus'], 'qcow2: Invalid cache option: bogus\n'],
    [['-T', 'direct'], 'qcow2: Invalid source cache option: direct\n'],
  ])('convert %j: commander words the error (as qemu-img)', async (options, line) => {
    const err: string[] = [];
    const failing: CliIo = { ...io, stderr: { write: (chunk) => void err.push(chunk) } };
    const args = [...options, 'a', 'b'];
    expect(convertFastPath(args)).toBeUndefined();
    expect(await run(['convert', ...args], failing)).toBe(1);
    expect(err.filter((text) => text.startsWith('qcow2:'))).toEqual([line]);
    expect(calls.convert).toHaveLength(0);
  });

  test.each([[['a', 'b', 'c']], [['-C', 'a', 'b']], [['-r', '1M', 'a', 'b']], [['--salvage', 'a', 'b']]])(
    'convert %j (several sources, -C, -r, --salvage) is left to commander',
    async (args) => {
      expect(convertFastPath(args)).toBeUndefined();
      expect(await run(['convert', ...args], io)).toBe(0);
      expect(calls.convert).toHaveLength(1);
    },
  );

  test('convert: commander hands several sources over as a list, the target last', async () => {
    expect(await run(['convert', '--salvage', '-r', '2k', '-q', 'a', 'b', 'c', 'out'], io)).toBe(0);
    expect(calls.convert[0]).toEqual([
      ['a', 'b', 'c'],
      'out',
      expect.objectContaining({ salvage: true, rateLimit: 2048, quiet: true, progress: false }),
    ]);
  });

  test('convert: -t reaches the command as given, -T does not', () => {
    expect(convertFastPath(['-t', 'writeback', '-T', 'none', 'a', 'b'])?.options.cache).toBe('writeback');
    expect(convertFastPath(['-T', 'none', 'a', 'b'])?.options).not.toHaveProperty('cache');
  });

  test.each([
    [['disk.qcow2', '1P']],
    [['-f', 'qcow2', 'disk.qcow2', '1P']],
    [['-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-o', 'refcount_bits=64,lazy_refcounts=on', 'd', '1T']],
    [['-f', 'raw', '-f', 'qcow2', 'disk', '10G', '-q']],
    [['-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2']],
    [['-u', '-b', 'base', '-F', 'raw', 'o', '1M', '--debug']],
    [['-o', '', 'disk', '0']],
    [['-', '1M']],
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

  test.each([
    [['disk.qcow2']],
    [['-q', '--output=json', '-f', 'qcow2', 'disk.qcow2']],
    [['-T', 'none', '-r', 'leaks', '-p', 'd', '-U']],
    [['-r', 'all', '--output', 'human', '--force-share', 'd']],
  ])('check %j', async (args) => {
    const fast = checkFastPath(args);
    expect(fast).toBeDefined();
    expect(await bothWays('check', args)).toEqual([fast!.file, fast!.options]);
  });

  test.each([
    [['disk.qcow2']],
    [['--output=json', '--start-offset', '1M', '--max-length=64k', 'd']],
    [['-f', 'raw', '-U', '--start-offset=512', 'd', '--debug']],
  ])('map %j', async (args) => {
    const fast = mapFastPath(args);
    expect(fast).toBeDefined();
    expect(await bothWays('map', args)).toEqual([fast!.file, fast!.options]);
  });

  test.each([
    [['-l', 'disk.qcow2']],
    [['disk.qcow2']],
    [['-c', 'before', '-q', 'd']],
    [['-a', '1', '-f', 'qcow2', 'd', '-U']],
    [['-d', 'old', '-d', 'older', 'd']],
  ])('snapshot %j', async (args) => {
    const fast = snapshotFastPath(args);
    expect(fast).toBeDefined();
    const [file, action, options] = await bothWays('snapshot', args);
    expect([file, options]).toEqual([fast!.file, fast!.options]);
    expect(action).toEqual((await import('../src/commands/snapshot.js')).snapshotAction(fast!.actions));
  });

  test('two snapshot actions fail the same way on both paths', async () => {
    const err: string[] = [];
    const failing: CliIo = { ...io, stderr: { write: (chunk) => void err.push(chunk) } };
    expect(snapshotFastPath(['-l', '-c', 'x', 'd'])).toBeDefined();
    expect(await run(['snapshot', '-l', '-c', 'x', 'd'], failing)).toBe(1);
    expect(await run(['--debug', 'snapshot', '-l', '-c', 'x', 'd'], failing)).toBe(1);
    expect(err.filter((line) => line.startsWith('qcow2:'))).toEqual([
      "qcow2: Cannot mix '-l', '-a', '-c', '-d'\n",
      "qcow2: Cannot mix '-l', '-a', '-c', '-d'\n",
    ]);
    expect(calls.snapshot).toHaveLength(0);
  });

  test('anything unusual is left to commander', () => {
    for (const args of [
      ['a'],
      ['a', 'b', 'c'],
      ['-Oraw', 'a', 'b'],
      ['-pq', 'a', 'b'],
      ['--help'],
      ['-f', 'vmdk', 'a', 'b'],
      ['-O', 'qcow2', 'a', 'b'],
      ['-O', 'vmdk', 'a', 'b'],
      ['-f', '-O', 'a', 'b'],
      ['a', 'b', '-f'],
      ['-S', '1000', 'a', 'b'],
      ['-m', '8', 'a', 'b'],
      ['--target-is-zero', '-n', 'a', 'b'],
      ['--output=json', 'a', 'b'],
      ['--', 'a', 'b'],
      ['-x', 'a', 'b'],
      ['-tnone', 'a', 'b'],
      ['-t', 'None', 'a', 'b'],
      ['-T', 'bogus', 'a', 'b'],
      ['a', 'b', '-t'],
    ]) {
      expect(convertFastPath(args), `convert ${args.join(' ')}`).toBeUndefined();
    }
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
    for (const args of [
      ['-T', 'fast', 'a'],
      ['-r', 'some', 'a'],
      ['-r'],
      ['-qp', 'a'],
      ['--output=yaml', 'a'],
    ]) {
      expect(checkFastPath(args), `check ${args.join(' ')}`).toBeUndefined();
    }
    for (const args of [
      ['--start-offset', 'lots', 'a'],
      ['--max-length', '-1', 'a'],
      ['-q', 'a'],
      ['a', 'b'],
    ]) {
      expect(mapFastPath(args), `map ${args.join(' ')}`).toBeUndefined();
    }
    for (const args of [['-lq', 'a'], ['-c'], ['-f', 'vmdk', '-l', 'a'], ['-l']]) {
      expect(snapshotFastPath(args), `snapshot ${args.join(' ')}`).toBeUndefined();
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
