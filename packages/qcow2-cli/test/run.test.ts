import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { type CliIo, parseSnapshotOption, run } from '../src/index.js';

function memoryIo(cwd: string, env: Record<string, string> = {}) {
  let stdout = '';
  let stderr = '';
  const io: CliIo = {
    stdout: {
      write: (chunk) => {
        stdout += chunk;
      },
    },
    stderr: {
      write: (chunk) => {
        stderr += chunk;
      },
    },
    cwd,
    env,
    isTTY: false,
  };
  return { io, out: () => stdout, err: () => stderr };
}

describe('run() in-process', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-test-'));
    writeFileSync(join(dir, 'disk.raw'), Buffer.alloc(8192, 0x41));
    truncateSync(join(dir, 'disk.raw'), 1048576);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('info --output=json on a raw file', async () => {
    const { io, out, err } = memoryIo(dir);
    expect(await run(['info', '--output=json', 'disk.raw'], io)).toBe(0);
    expect(err()).toBe('');
    const json = JSON.parse(out());
    expect(json).toMatchObject({
      'virtual-size': 1048576,
      filename: 'disk.raw',
      format: 'raw',
      'dirty-flag': false,
    });
    expect(Object.keys(json)).toEqual(['virtual-size', 'filename', 'format', 'actual-size', 'dirty-flag']);
  });

  test('convert -O raw copies the bytes', async () => {
    const { io, err } = memoryIo(dir);
    expect(await run(['convert', '-O', 'raw', 'disk.raw', 'copy.raw'], io)).toBe(0);
    expect(err()).toBe('');
    const { readFileSync } = await import('node:fs');
    expect(readFileSync(join(dir, 'copy.raw')).equals(readFileSync(join(dir, 'disk.raw')))).toBe(true);
  });

  test('convert -p draws qemu-img style progress on stderr', async () => {
    const { io, err } = memoryIo(dir);
    expect(await run(['convert', '-p', 'disk.raw', 'copy2.raw'], io)).toBe(0);
    expect(err()).toMatch(/^ {4}\(0\.00\/100%\)\r.* {4}\(100\.00\/100%\)\r\n$/s);
  });

  test('convert refuses to overwrite its own source', async () => {
    const { io, err } = memoryIo(dir);
    const { readFileSync, statSync } = await import('node:fs');
    const before = readFileSync(join(dir, 'disk.raw'));
    expect(await run(['convert', '-O', 'raw', 'disk.raw', `${dir}/./disk.raw`], io)).toBe(1);
    expect(err()).toMatch(/^qcow2: Could not create '.*disk.raw': it is a file the source image reads/);
    expect(statSync(join(dir, 'disk.raw')).size).toBe(1048576);
    expect(readFileSync(join(dir, 'disk.raw')).equals(before)).toBe(true);
  });

  test('convert -p -q stays silent', async () => {
    const { io, out, err } = memoryIo(dir);
    expect(await run(['convert', '-p', '-q', 'disk.raw', 'copy3.raw'], io)).toBe(0);
    expect(out() + err()).toBe('');
  });

  test.each([
    [['info', 'missing.qcow2'], /^qcow2: Could not open 'missing.qcow2': No such file or directory\n$/],
    [['info', '-f', 'vmdk', 'disk.raw'], /^qcow2: .*Unknown driver 'vmdk'/],
    [['info', '--frobnicate', 'disk.raw'], /^qcow2: unknown option '--frobnicate'\n$/],
    [['map', '--max-length=12x', 'disk.raw'], /^qcow2: .*Invalid max length specified: '12x'/],
    [['info', '--output=xml', 'disk.raw'], /^qcow2: .*xml/],
    [['convert', '-O', 'vdi', 'disk.raw', 'x.vdi'], /^qcow2: .*output format 'vdi'/],
    [
      ['convert', '-l', 'snapshot.name=nope', 'disk.raw', 'x.raw'],
      /^qcow2: Failed to load snapshot: Can't find snapshot\n$/,
    ],
    [['info'], /^qcow2: missing required argument 'file'\n$/],
    [['help', 'bogus'], /^qcow2: unknown command 'bogus'\n$/],
    [[], /^qcow2: a command is needed/],
    [['convert', 'disk.raw', '/dev/null'], /^qcow2: Could not create '\/dev\/null': not a regular file/],
    [['info', 'a', 'b'], /^qcow2: too many arguments for 'info'/],
  ])('%j fails with exit 1 and one line', async (argv, message) => {
    const { io, err } = memoryIo(dir);
    expect(await run(argv, io)).toBe(1);
    expect(err()).toMatch(message);
    expect(err().trimEnd().split('\n')).toHaveLength(1);
  });

  test('a stack trace only with --debug or QCOW2_DEBUG=1', async () => {
    for (const [argv, env] of [
      [['--debug', 'info', 'missing.raw'], {}],
      [['info', 'missing.raw'], { QCOW2_DEBUG: '1' }],
    ] as const) {
      const { io, err } = memoryIo(dir, env);
      expect(await run(argv, io)).toBe(1);
      expect(err()).toMatch(/\n {4}at /);
    }
  });

  test('check on a raw file: the format has no checks (exit 63, as qemu-img)', async () => {
    const { io, err } = memoryIo(dir);
    expect(await run(['check', 'disk.raw'], io)).toBe(63);
    expect(err()).toBe('qcow2: This image format does not support checks\n');
  });

  test('--help and help SUBCOMMAND print usage and exit 0', async () => {
    for (const argv of [['--help'], ['help', 'convert'], ['convert', '--help']]) {
      const { io, out } = memoryIo(dir);
      expect(await run(argv, io)).toBe(0);
      expect(out()).toMatch(/Usage: qcow2/);
    }
  });
});

describe('parseSnapshotOption', () => {
  test('reads -l and -s as qemu-img does', () => {
    expect(parseSnapshotOption('snapshot.name=a', undefined)).toEqual({ name: 'a' });
    expect(parseSnapshotOption('snapshot.id=3', undefined)).toEqual({ id: '3' });
    expect(parseSnapshotOption('s1', undefined)).toEqual({ idOrName: 's1' });
    expect(parseSnapshotOption(undefined, 's1')).toEqual({ idOrName: 's1' });
    expect(parseSnapshotOption(undefined, undefined)).toBeUndefined();
    expect(() => parseSnapshotOption('a', 'b')).toThrow(/together/);
    expect(() => parseSnapshotOption('snapshot.foo=1', undefined)).toThrow(/snapshot/);
  });
});
