/**
 * NBD_FLAG_SEND_FAST_ZERO through libnbd (nbdsh), with qemu-nbd as the oracle: the same
 * WRITE_ZEROES requests, with and without NBD_CMD_FLAG_FAST_ZERO, go to a qcow2 image served by
 * qcow2-nbd and to a copy served by qemu-nbd. Both must advertise the flag alike, succeed or fail
 * with ENOTSUP alike, and leave images that compare identical (and check clean); a refused
 * request leaves the export unchanged. Raw and read-only
 * exports advertise the flag only when they can honour it.
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runNbdsh, startQemuNbd, startServer } from '../src/nbd-server.js';
import { requireTools, run, tempDir } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdsh');

const KiB = 1024;
const CLUSTER = 64 * KiB;

/**
 * Runs on the export at $URI: prints `can_fast_zero`, then one line per request, `ok` or the
 * errno name it failed with. Offsets are in clusters of 64 KiB; the image holds data in its first
 * 16 clusters and nothing after.
 */
const SCRIPT = `
import errno, os
C = ${CLUSTER}
h.connect_uri(os.environ["URI"])
print("can_fast_zero", h.can_fast_zero())
def attempt(name, offset, length, flags):
    try:
        h.zero(length, offset, flags)
        print(name, "ok")
    except nbd.Error as error:
        print(name, errno.errorcode.get(error.errno, error.errno))
if os.environ.get("TAIL") == "1":
    attempt("whole clusters then a data tail", 8 * C, 2 * C + 512, nbd.CMD_FLAG_FAST_ZERO)
elif h.can_fast_zero():
    FAST = nbd.CMD_FLAG_FAST_ZERO
    attempt("whole clusters over data", 2 * C, 3 * C, FAST)
    attempt("inside a data cluster", 6 * C + 100, 1000, FAST)
    attempt("a data head then whole clusters", 11 * C - 4096, C + 4096, FAST)
    attempt("inside an unallocated cluster", 20 * C + 512, 1024, FAST)
    attempt("unallocated, unaligned ends", 24 * C + 4096, 3 * C, FAST)
    attempt("whole clusters, no hole", 13 * C, 2 * C, FAST | nbd.CMD_FLAG_NO_HOLE)
attempt("slow zeroes inside a data cluster", 6 * C + 100, 1000, 0)
h.flush()
h.shutdown()
`;

async function nbdsh(uri: string, tail = false): Promise<string[]> {
  const result = await runNbdsh(SCRIPT, { URI: uri, TAIL: tail ? '1' : '0' });
  if (result.status !== 0) throw new Error(`nbdsh failed: ${result.stderr}`);
  return result.stdout.trim().split('\n');
}

describe.skipIf(!ok)('FAST_ZERO (NBD_FLAG_SEND_FAST_ZERO) against qemu-nbd', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-nbd-fast-zero-');
  });
  afterAll(() => dir?.remove());

  it('a writable qcow2 export zeroes fast exactly where qemu-nbd does, leaving the same image', async () => {
    const ours = join(dir.path, 'ours.qcow2');
    const theirs = join(dir.path, 'theirs.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ours, '4M']);
    run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${16 * CLUSTER}`, ours]);
    copyFileSync(ours, theirs);

    const server = await startServer(dir.path, ['-t', '-f', 'qcow2', ours]);
    let ourLines: string[];
    let tailLines: string[];
    try {
      ourLines = await nbdsh(server.uri);
      // qemu-nbd zeroes the whole clusters of this one before refusing its tail (QEMU splits the
      // request): ours refuses before changing anything, so it is not compared.
      tailLines = await nbdsh(server.uri, true);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const qemu = startQemuNbd(dir.path, ['-f', 'qcow2', theirs]);
    let theirLines: string[];
    try {
      theirLines = await nbdsh(qemu.uri);
    } finally {
      await qemu.stop();
    }

    expect(ourLines[0]).toBe('can_fast_zero True');
    expect(ourLines).toEqual(theirLines);
    expect(ourLines).toContain('whole clusters over data ok');
    expect(ourLines).toContain('inside a data cluster ENOTSUP');
    expect(tailLines).toContain('whole clusters then a data tail ENOTSUP');
    expect(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs])).toContain('identical');
    run('qemu-img', ['check', '-f', 'qcow2', ours]);
    // A refused request changed nothing: the data tail and head are still there.
    const read = run('qemu-io', [
      '-f',
      'qcow2',
      '-r',
      '-c',
      `read -P 0x5a ${8 * CLUSTER} ${2 * CLUSTER + 512}`,
      '-c',
      `read -P 0x5a ${11 * CLUSTER - 4096} 4096`,
      '-c',
      `read -P 0 ${2 * CLUSTER} ${3 * CLUSTER}`,
      ours,
    ]);
    expect(read).not.toContain('Pattern verification failed');
  });

  it('a raw export offers fast zeroing (hole punching); a read-only export does not', async () => {
    const raw = join(dir.path, 'disk.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', raw, '4M']);
    run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${16 * CLUSTER}`, raw]);
    const writable = await startServer(dir.path, ['-t', '-f', 'raw', raw]);
    let lines: string[];
    try {
      lines = await nbdsh(writable.uri);
    } finally {
      expect(await writable.stop()).toBe(0);
    }
    expect(lines[0]).toBe('can_fast_zero True');
    // Punching holes is fast anywhere in a raw file, partial blocks included.
    expect(
      lines.filter((line) => !line.startsWith('can_fast_zero')).every((line) => line.endsWith(' ok')),
    ).toBe(true);
    expect(
      run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0 ${2 * CLUSTER} ${3 * CLUSTER}`, raw]),
    ).not.toContain('Pattern verification failed');

    const readOnly = await startServer(dir.path, ['-t', '-r', '-f', 'raw', raw]);
    try {
      const result = await runNbdsh(
        'import os\nh.connect_uri(os.environ["URI"])\nprint("can_fast_zero", h.can_fast_zero())',
        { URI: readOnly.uri },
      );
      expect(result.stdout.trim()).toBe('can_fast_zero False');
    } finally {
      expect(await readOnly.stop()).toBe(0);
    }
  });
});
