import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { type CliIo, run } from '../src/index.js';

describe('run(): convert with and without commander', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-args-'));
    const disk = Buffer.alloc(1 << 20);
    disk.fill(0x5a, 4096, 12288);
    writeFileSync(join(dir, 'disk.raw'), disk);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const runIn = async (argv: string[], stdoutStream?: PassThrough) => {
    let stderr = '';
    const io: CliIo = {
      stdout: { write: () => undefined },
      ...(stdoutStream === undefined ? {} : { stdoutStream }),
      stderr: {
        write: (chunk) => {
          stderr += chunk;
        },
      },
      cwd: dir,
      env: {},
      isTTY: false,
    };
    return { code: await run(argv, io), stderr };
  };

  test('both parsers make the same file', async () => {
    expect(await runIn(['convert', '-f', 'raw', '-O', 'raw', 'disk.raw', 'fast.raw'])).toEqual({
      code: 0,
      stderr: '',
    });
    expect(await runIn(['convert', '-fraw', '-Oraw', 'disk.raw', 'commander.raw'])).toEqual({
      code: 0,
      stderr: '',
    });
    const source = readFileSync(join(dir, 'disk.raw'));
    expect(readFileSync(join(dir, 'fast.raw')).equals(source)).toBe(true);
    expect(readFileSync(join(dir, 'commander.raw')).equals(source)).toBe(true);
  });

  test.each([
    ['fast path', ['convert', '-f', 'raw', '-O', 'raw', 'disk.raw', '-']],
    ['commander', ['convert', '-fraw', '-Oraw', 'disk.raw', '-']],
  ])('%s: a target of - writes every byte to the stdout stream', async (_name, argv) => {
    const stream = new PassThrough();
    const received: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => received.push(chunk));
    expect(await runIn(argv, stream)).toEqual({ code: 0, stderr: '' });
    expect(Buffer.concat(received).equals(readFileSync(join(dir, 'disk.raw')))).toBe(true);
  });

  test('a target of - without a stdout stream is one clear line', async () => {
    const { code, stderr } = await runIn(['convert', '-O', 'raw', 'disk.raw', '-']);
    expect(code).toBe(1);
    expect(stderr).toMatch(/^qcow2: convert: target '-' needs a binary stdout/);
  });

  test.each([
    ['fast path', ['convert', '-n', '-f', 'raw', '-O', 'raw', 'disk.raw', 'existing.raw']],
    ['commander', ['convert', '-n', '-fraw', '-Oraw', 'disk.raw', 'existing.raw']],
  ])('%s: -n writes into the existing file and leaves what lies past the guest', async (_name, argv) => {
    writeFileSync(join(dir, 'existing.raw'), Buffer.alloc((1 << 20) + 4096, 0xee));
    expect(await runIn(argv)).toEqual({ code: 0, stderr: '' });
    const written = readFileSync(join(dir, 'existing.raw'));
    expect(written.subarray(0, 1 << 20).equals(readFileSync(join(dir, 'disk.raw')))).toBe(true);
    expect(written.subarray(1 << 20).every((byte) => byte === 0xee)).toBe(true);
  });

  test.each([
    [['convert', '-f', 'vmdk', 'disk.raw', 'x.raw'], /^qcow2: .*Unknown driver 'vmdk'/],
    // qemu-img's words: the last name is the target, so one name leaves no source.
    [['convert', 'disk.raw'], /^qcow2: Must specify image file name\n$/],
    [['convert'], /^qcow2: Must specify image file name\n$/],
    [
      ['convert', '-C', '-c', '-O', 'qcow2', 'disk.raw', 'x.qcow2'],
      /^qcow2: Cannot enable copy offloading when -c is used\n$/,
    ],
    [
      ['convert', '-C', '-S', '4k', 'disk.raw', 'x.raw'],
      /^qcow2: Cannot enable copy offloading when -S is used\n$/,
    ],
    [
      ['convert', '-C', '--salvage', 'disk.raw', 'x.raw'],
      /^qcow2: Cannot use copy offloading in salvaging mode\n$/,
    ],
    [
      ['convert', '-r', '1x', 'disk.raw', 'x.raw'],
      /^qcow2: Invalid rate limit specified. You may use k, M, G/,
    ],
    [
      ['convert', '-r', '8E', 'disk.raw', 'x.raw'],
      /^qcow2: Invalid rate limit specified. Must be between 0 and 9223372036854775807.\n$/,
    ],
    [
      ['convert', '-s', 'snap', 'disk.raw', 'disk.raw', 'x.raw'],
      /^qcow2: No support for concatenating multiple snapshot\n$/,
    ],
    [
      ['convert', '--bitmaps', '-O', 'qcow2', 'disk.raw', 'disk.raw', 'x.qcow2'],
      /^qcow2: Copying bitmaps only possible with single source\n$/,
    ],
    [['convert', '-x', 'disk.raw', 'x.raw'], /^qcow2: unknown option '-x'\n$/],
  ])('%j is reported by commander', async (argv, message) => {
    const { code, stderr } = await runIn(argv);
    expect(code).toBe(1);
    expect(stderr).toMatch(message);
  });
});
