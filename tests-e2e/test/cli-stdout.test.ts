/**
 * The built `qcow2` bin writes its text output straight to file descriptors 1 and 2 (no Node
 * stdio stream unless it needs one: packages/qcow2-cli/src/bin/qcow2.ts). A descriptor that would
 * block (a non-blocking pipe whose reader is slow) must hand the rest to the stream without losing
 * or reordering a byte, and a descriptor that fails must give one line and exit 1.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io', 'python3');

/** Runs `argv` with stdout a non-blocking pipe that is read only after 0.3 s (so it fills up). */
const SLOW_NONBLOCKING_READER = `
import fcntl, os, subprocess, sys, time
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
child = subprocess.Popen(sys.argv[1:], stdout=w)
os.close(w)
time.sleep(0.3)
out = b''
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    out += chunk
sys.stdout.buffer.write(out)
sys.exit(child.wait())
`;

describe.skipIf(!haveTools)('qcow2 bin output descriptors', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-stdout-');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'many.qcow2', '64M'], {
      cwd: dir.path,
    });
    // Every other 4 KiB cluster of the first 12 MiB: ~3000 map entries, ~300 KB of JSON.
    const writes = Array.from({ length: 1536 }, (_, i) => ['-c', `write -P 1 ${i * 8192} 4096`]).flat();
    run('qemu-io', ['-f', 'qcow2', ...writes, 'many.qcow2'], { cwd: dir.path });
  });
  afterAll(() => dir?.remove());

  test('a non-blocking pipe that fills up gets every byte, in order', () => {
    const expected = run('qemu-img', ['map', '--output=json', 'many.qcow2'], { cwd: dir.path });
    expect(expected.length).toBeGreaterThan(4 * 65536);
    const ours = runStatus(
      'python3',
      ['-c', SLOW_NONBLOCKING_READER, process.execPath, QCOW2_BIN, 'map', '--output=json', 'many.qcow2'],
      { cwd: dir.path },
    );
    expect(ours.stderr).toBe('');
    expect(ours.status).toBe(0);
    expect(ours.stdout).toBe(expected);
  });

  test('stdout that cannot be written (/dev/full): one line on stderr, exit 1', () => {
    const result = runStatus(
      'sh',
      ['-c', `"${process.execPath}" "${QCOW2_BIN}" info many.qcow2 > /dev/full`],
      { cwd: dir.path },
    );
    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(/^qcow2: cannot write to stdout: .*ENOSPC.*\n$/);
  });
});
