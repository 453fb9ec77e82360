/**
 * `qcow2 convert SRC1 SRC2 ... DST` (qemu-img's concatenation), `-C` (copy offloading) and `-r`
 * (rate limit) against qemu-img 7.2: both tools run the same command line, each in its own copy of
 * one folder; the outputs must compare identical (qemu-img compare), be the same size (and the same
 * guest size), allocate the same ranges where qemu-img's choice is visible, and refusals must exit
 * and read as qemu-img's.
 */
import { cpSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN, qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

interface Outcome {
  readonly status: number;
  readonly stdout: string;
  readonly stderr: string;
}

describe.skipIf(!haveTools)('qcow2 convert with several sources, -C and -r', () => {
  let dir: { path: string; remove: () => void };
  let round = 0;
  beforeAll(() => {
    dir = tempDir('qcowkit-sources-');
    const seed = join(dir.path, 'seed');
    run('mkdir', ['-p', seed]);
    const img = (...args: string[]) => run('qemu-img', args, { cwd: seed });
    const io = (format: string, file: string, ...commands: string[]) =>
      run('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), file], { cwd: seed });
    // A qcow2 image with data, zeros written as data, a compressed cluster and a snapshot.
    img('create', '-q', '-f', 'qcow2', 'a.qcow2', '3M');
    io('qcow2', 'a.qcow2', 'write -P 0x11 0 1M', 'write -P 0 1M 64k', 'write -c -P 0x12 2M 64k');
    img('snapshot', '-c', 'snap', 'a.qcow2');
    io('qcow2', 'a.qcow2', 'write -P 0x13 0 64k');
    // A raw file whose length is not a multiple of 512 (a guest of 2 sectors).
    img('create', '-q', '-f', 'raw', 'b.raw', '1000');
    io('raw', 'b.raw', 'write -P 0x21 0 512');
    truncateSync(join(seed, 'b.raw'), 1000);
    // An overlay on a backing file: its guest is the whole chain's.
    img('create', '-q', '-f', 'qcow2', 'base.qcow2', '2M');
    io('qcow2', 'base.qcow2', 'write -P 0x31 0 2M');
    img('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '2M');
    io('qcow2', 'top.qcow2', 'write -P 0x32 64k 64k', 'write -z 1M 64k');
    // A raw source with zeros written as data (raw block status: all data).
    img('create', '-q', '-f', 'raw', 'z.raw', '1M');
    io('raw', 'z.raw', 'write -P 0 0 256k', 'write -P 0x41 256k 256k');
    // Targets for -n, full of 0x77.
    for (const [format, name] of [
      ['raw', 'into.raw'],
      ['qcow2', 'into.qcow2'],
    ] as const) {
      img('create', '-q', '-f', format, name, '12M');
      io(format, name, 'write -P 0x77 0 12M');
    }
  });
  afterAll(() => dir?.remove());

  /** Runs `args` with qemu-img and with ours, each in its own fresh copy of the seed folder. */
  const both = (args: readonly string[]): { theirs: Outcome; ours: Outcome; q: string; o: string } => {
    round++;
    const q = join(dir.path, `q${round}`);
    const o = join(dir.path, `o${round}`);
    cpSync(join(dir.path, 'seed'), q, { recursive: true });
    cpSync(join(dir.path, 'seed'), o, { recursive: true });
    return { theirs: runStatus('qemu-img', args, { cwd: q }), ours: qcow2(args, { cwd: o }), q, o };
  };

  const identical = (format: string, a: string, b: string) => {
    const result = runStatus('qemu-img', ['compare', '-f', format, '-F', format, a, b]);
    expect(result.status, result.stdout + result.stderr).toBe(0);
  };

  const guestSize = (format: string, file: string): number =>
    JSON.parse(run('qemu-img', ['info', '--output=json', '-f', format, file]))['virtual-size'];

  /** The map with host offsets left out (which layout each tool chose is its own). */
  const allocation = (format: string, file: string) =>
    JSON.parse(run('qemu-img', ['map', '--output=json', '-f', format, file])).map(
      ({ offset: _offset, ...rest }: Record<string, unknown>) => rest,
    );

  const sources = ['a.qcow2', 'b.raw', 'top.qcow2', 'z.raw'];

  test.each([
    ['raw', []],
    ['qcow2', []],
    ['qcow2', ['-c']],
    ['qcow2', ['-o', 'cluster_size=4k,compression_type=zstd', '-c']],
    ['raw', ['-S', '0']],
    ['raw', ['-l', 'snapshot.name=snap']],
    ['qcow2', ['-l', 'snapshot.id=1', '-m', '3']],
  ] as const)('-O %s %j: one guest after another, as qemu-img concatenates them', (format, flags) => {
    const out = `out.${format}`;
    const { theirs, ours, q, o } = both(['convert', '-O', format, ...flags, ...sources, out]);
    expect(theirs.status, theirs.stderr).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    expect(ours.stdout + ours.stderr).toBe('');
    // 3 MiB + 1 KiB (1000 bytes as whole sectors) + 2 MiB + 1 MiB.
    expect(guestSize(format, join(o, out))).toBe(6 * 2 ** 20 + 1024);
    expect(guestSize(format, join(o, out))).toBe(guestSize(format, join(q, out)));
    identical(format, join(q, out), join(o, out));
    if (format === 'raw') {
      expect(statSync(join(o, out)).size).toBe(statSync(join(q, out)).size);
      expect(allocation('raw', join(o, out))).toEqual(allocation('raw', join(q, out)));
    } else {
      run('qemu-img', ['check', '-q', join(o, out)]);
    }
  });

  test('the snapshot of -l snapshot.name= is the first source only, as qemu-img loads it', () => {
    const { ours, o } = both([
      'convert',
      '-l',
      'snapshot.name=snap',
      '-O',
      'raw',
      'a.qcow2',
      'a.qcow2',
      'two.raw',
    ]);
    expect(ours.status, ours.stderr).toBe(0);
    const bytes = readFileSync(join(o, 'two.raw'));
    expect(bytes[0]).toBe(0x11); // the snapshot
    expect(bytes[3 * 2 ** 20]).toBe(0x13); // the second source as it is now
  });

  test.each([['raw'], ['qcow2']])('-n -O %s writes the concatenation into an existing image', (format) => {
    const into = `into.${format}`;
    const { theirs, ours, q, o } = both(['convert', '-n', '-O', format, ...sources, into]);
    expect(theirs.status, theirs.stderr).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    identical(format, join(q, into), join(o, into));
    if (format === 'qcow2') run('qemu-img', ['check', '-q', join(o, into)]);
    // Too small for both tools: the same words.
    const small = both([
      'convert',
      '-n',
      '-O',
      'raw',
      'a.qcow2',
      'a.qcow2',
      'a.qcow2',
      'a.qcow2',
      'b.raw',
      'into.raw',
    ]);
    expect(small.theirs.status).toBe(1);
    expect(small.ours.status).toBe(1);
    expect(small.ours.stderr.replace(/^qcow2: /, '')).toBe(small.theirs.stderr.replace(/^qemu-img: /, ''));
  });

  test('a target of - streams the concatenation (qemu-img writes a file named -), -p on stderr', () => {
    const { ours, o } = both(['convert', '-O', 'raw', ...sources, 'file.raw']);
    expect(ours.status, ours.stderr).toBe(0);
    const piped = runStatus(
      'sh',
      [
        '-c',
        `"${process.execPath}" "${QCOW2_BIN}" convert -p -O raw ${sources.join(' ')} - 2>progress.txt | cmp - file.raw`,
      ],
      { cwd: o },
    );
    expect(piped.stdout + piped.stderr).toBe('');
    expect(piped.status).toBe(0);
    expect(readFileSync(join(o, 'progress.txt'), 'utf8')).toMatch(
      /^ {4}\(0\.00\/100%\)\r( {4}\(\d{1,3}\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\n$/,
    );
  });

  test.each([
    [['-s', 'snap'], 'No support for concatenating multiple snapshot', false],
    [['-l', 'snap'], 'No support for concatenating multiple snapshot', true],
    [
      ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2'],
      'Having a backing file for the target makes no sense when concatenating multiple input images',
      true,
    ],
    [
      ['-O', 'qcow2', '-B', 'base.qcow2'],
      'Having a backing file for the target makes no sense when concatenating multiple input images',
      true,
    ],
    [
      ['-O', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2'],
      'Having a backing file for the target makes no sense when concatenating multiple input images',
      true,
    ],
    [['-O', 'qcow2', '--bitmaps'], 'Copying bitmaps only possible with single source', true],
    [['-O', 'raw', '--bitmaps'], 'Copying bitmaps only possible with single source', true],
    [
      ['-O', 'raw', '-B', 'base.qcow2', '-F', 'qcow2'],
      "Backing file not supported for file format 'raw'",
      true,
    ],
  ])('%j with several sources is refused as qemu-img refuses it', (flags, message, sameLine) => {
    const { theirs, ours, o } = both(['convert', ...flags, 'a.qcow2', 'top.qcow2', 'out.img']);
    expect(theirs.status).toBe(1);
    expect(ours.status).toBe(1);
    expect(ours.stdout).toBe('');
    expect(ours.stderr).toBe(`qcow2: ${message}\n`);
    // qemu-img 7.2 has no -s: it refuses the flag itself.
    if (sameLine) expect(theirs.stderr).toBe(`qemu-img: ${message}\n`);
    expect(() => statSync(join(o, 'out.img'))).toThrow();
  });

  test.each([
    [['-C', '-c', '-O', 'qcow2'], 'Cannot enable copy offloading when -c is used'],
    [['-c', '-C', '-O', 'qcow2', '--salvage'], 'Cannot enable copy offloading when -c is used'],
    [['-C', '-S', '4k'], 'Cannot enable copy offloading when -S is used'],
    [['-C', '-S', '0'], 'Cannot enable copy offloading when -S is used'],
    [['-C', '--salvage'], 'Cannot use copy offloading in salvaging mode'],
    [['-r', '1x'], 'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for'],
    [['-r', '-1'], 'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for'],
    [['-r', '1.5'], 'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for'],
    [['-r', ''], 'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for'],
    [['-r', '8E'], 'Invalid rate limit specified. Must be between 0 and 9223372036854775807.'],
    [
      ['-r', '9223372036854775808'],
      'Invalid rate limit specified. Must be between 0 and 9223372036854775807.',
    ],
  ])('%j is refused as qemu-img refuses it, before any file is touched', (flags, message) => {
    const { theirs, ours, o } = both(['convert', ...flags, 'a.qcow2', 'out.img']);
    expect(theirs.status).toBe(1);
    expect(ours.status).toBe(1);
    expect(theirs.stderr.split('\n')[0]).toBe(`qemu-img: ${message}`);
    // One line (qemu-img breaks the suffix hint over two).
    expect(ours.stderr).toMatch(new RegExp(`^qcow2: ${message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}.*\n$`));
    expect(() => statSync(join(o, 'out.img'))).toThrow();
  });

  // A guest of 1 KiB: the first write goes at once, so even 1.5 KiB a second takes no time.
  test.each([['0'], ['1.5k'], ['0x10000'], ['7E'], ['64M']])(
    '-r %s is taken as qemu-img takes it',
    (rate) => {
      const { theirs, ours, q, o } = both(['convert', '-r', rate, '-O', 'raw', 'b.raw', 'out.raw']);
      expect(theirs.status, theirs.stderr).toBe(0);
      expect(ours.status, ours.stderr).toBe(0);
      identical('raw', join(q, 'out.raw'), join(o, 'out.raw'));
    },
  );

  test.each([
    ['raw', [], 'out.raw'],
    ['qcow2', [], 'out.qcow2'],
    ['raw', ['-n'], 'into.raw'],
    ['qcow2', ['-n'], 'into.qcow2'],
    ['raw', ['-n', '--target-is-zero'], 'into.raw'],
  ] as const)(
    '-C -O %s %j: data copied whole and zeros left out, as qemu-img copy offloading',
    (format, flags, out) => {
      const { theirs, ours, q, o } = both(['convert', '-C', '-O', format, ...flags, 'a.qcow2', 'z.raw', out]);
      expect(theirs.status, theirs.stderr).toBe(0);
      expect(ours.status, ours.stderr).toBe(0);
      identical(format, join(q, out), join(o, out));
      // The zeros written as data (the qcow2 cluster at 1 MiB, z.raw's first 256 KiB) stay
      // allocated, the zero ranges do not: the same map as qemu-img's.
      expect(allocation(format, join(o, out))).toEqual(allocation(format, join(q, out)));
      if (format === 'qcow2') run('qemu-img', ['check', '-q', join(o, out)]);
    },
  );

  test('-C with one source and a rate limit: the same bytes', () => {
    const { theirs, ours, q, o } = both(['convert', '-C', '-r', '1G', '-O', 'raw', 'top.qcow2', 'out.raw']);
    expect(theirs.status, theirs.stderr).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    expect(readFileSync(join(o, 'out.raw')).equals(readFileSync(join(q, 'out.raw')))).toBe(true);
  });
});
