/**
 * The CLI as a library: `run(argv, io)` from `@qcowkit/qcow2-cli`, in this process, on images made
 * by qemu-img; what it writes to its io equals what qemu-img prints.
 */
import { type CliIo, run as runCli } from '@qcowkit/qcow2-cli';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

function capture(cwd: string): { io: CliIo; out: () => string; err: () => string } {
  let out = '';
  let err = '';
  return {
    io: {
      stdout: {
        write: (text) => {
          out += text;
        },
      },
      stderr: {
        write: (text) => {
          err += text;
        },
      },
      cwd,
      env: {},
      isTTY: false,
    },
    out: () => out,
    err: () => err,
  };
}

describe.skipIf(!haveTools)('run() in-process on qemu-img images', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-inproc-');
    run('qemu-img', ['create', '-q', '-f', 'raw', 'base.raw', '2M'], { cwd: dir.path });
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 3 0 300k', 'base.raw'], { cwd: dir.path });
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2', '4M'], {
      cwd: dir.path,
    });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 4 100k 200k', '-c', 'write -z 1M 64k', 'top.qcow2'], {
      cwd: dir.path,
    });
    run('qemu-img', ['snapshot', '-c', 'snap', 'top.qcow2'], { cwd: dir.path });
  });
  afterAll(() => dir?.remove());

  test.each([
    [['info', '--output=json', 'top.qcow2']],
    [['info', '--backing-chain', 'top.qcow2']],
    [['map', '--output=json', 'top.qcow2']],
    [['map', 'top.qcow2']],
    [['check', '--output=json', 'top.qcow2']],
  ])('%j writes what qemu-img prints', async (argv) => {
    const { io, out, err } = capture(dir.path);
    const code = await runCli(argv, io);
    const theirs = runStatus('qemu-img', argv, { cwd: dir.path });
    expect(err()).toBe('');
    expect(code).toBe(theirs.status);
    expect(out()).toBe(theirs.stdout);
  });
});
