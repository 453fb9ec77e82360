/**
 * A real ext4 file system through qcow2-nbd and nbdfuse, on a raw file and on a writable qcow2
 * image: mke2fs writes it through the FUSE file, e2fsck finds it clean, the qcow2 image is
 * `qemu-img check`-clean after a clean stop, and the files read back identical afterwards.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const BIN = fileURLToPath(new URL('../../packages/qcow2-nbd/dist/bin/qcow2-nbd.js', import.meta.url));
const tools = requireTools('nbdfuse', 'fusermount3', 'mke2fs', 'e2fsck', 'debugfs', 'qemu-img');
const fuse = existsSync('/dev/fuse');
if (tools && !fuse) {
  if (process.env.CI) throw new Error('nbd-fuse: /dev/fuse is missing');
  console.warn('SKIPPED: nbd-fuse needs /dev/fuse');
}

function waitFor(check: () => boolean, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 20_000;
    const poll = () => {
      if (check()) resolve();
      else if (Date.now() > deadline) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(poll, 50);
    };
    poll();
  });
}

function exited(child: ChildProcess): Promise<number | null> {
  return child.exitCode !== null
    ? Promise.resolve(child.exitCode)
    : new Promise((resolve) => child.once('exit', resolve));
}

describe.skipIf(!tools || !fuse)('ext4 through nbdfuse', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-nbdfuse-');
  });
  afterAll(() => dir.remove());

  it.each(['raw', 'qcow2'])(
    'mke2fs -d onto the FUSE file (%s), e2fsck clean, files identical',
    async (format) => {
      const image = join(dir.path, `fs.${format}`);
      const source = join(dir.path, `source-${format}`);
      const mount = join(dir.path, `mnt-${format}`);
      const socket = join(dir.path, `nbd-${format}.sock`);
      mkdirSync(join(source, 'sub'), { recursive: true });
      mkdirSync(mount);
      const files: Record<string, Buffer> = {
        'hello.txt': Buffer.from('hello through NBD\n'),
        'sub/random.bin': Buffer.from(Array.from({ length: 777_777 }, (_, i) => (i * 2654435761) >>> 24)),
        'sub/zeros.bin': Buffer.alloc(2 * 1024 * 1024),
      };
      for (const [name, content] of Object.entries(files)) writeFileSync(join(source, name), content);
      run('qemu-img', ['create', '-f', format, image, '64M']);

      const server = spawn(process.execPath, [BIN, '-f', format, '-t', '-k', socket, image], {
        stdio: 'ignore',
      });
      let fuseProcess: ChildProcess | undefined;
      try {
        await waitFor(() => existsSync(socket), 'the NBD socket');
        const disk = join(mount, 'disk');
        fuseProcess = spawn('nbdfuse', [disk, '--unix', socket], { stdio: 'ignore' });
        await waitFor(() => existsSync(disk), 'the FUSE file');
        run('mke2fs', ['-q', '-t', 'ext4', '-F', '-d', source, disk]);
        const check = runStatus('e2fsck', ['-fn', disk]);
        expect(check.status, check.stdout + check.stderr).toBe(0);
        run('fusermount3', ['-u', mount]);
        await exited(fuseProcess);
      } finally {
        if (fuseProcess !== undefined && fuseProcess.exitCode === null) {
          runStatus('fusermount3', ['-u', mount]);
          fuseProcess.kill('SIGTERM');
        }
        server.kill('SIGTERM');
        expect(await exited(server)).toBe(0);
      }
      let rawImage = image;
      if (format === 'qcow2') {
        const check = runStatus('qemu-img', ['check', image]);
        expect(check.status, check.stdout + check.stderr).toBe(0);
        rawImage = join(dir.path, 'fs-from-qcow2.raw');
        run('qemu-img', ['convert', '-O', 'raw', image, rawImage]);
      }
      expect(runStatus('e2fsck', ['-fn', rawImage]).status).toBe(0);
      for (const [name, content] of Object.entries(files)) {
        const copy = join(dir.path, 'copy.bin');
        run('debugfs', ['-R', `dump /${name} ${copy}`, rawImage]);
        expect(readFileSync(copy).equals(content), name).toBe(true);
      }
    },
  );
});
