/**
 * The `qcow2` bin as a user meets it: bad input ends in exit 1 and one line on stderr, never a
 * stack trace unless asked; help and version work.
 */
import { spawn } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN, qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('qcow2 CLI errors and help', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-cli-');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'snap.qcow2', '1M'], { cwd: dir.path });
    run('qemu-img', ['snapshot', '-c', 'one', 'snap.qcow2'], { cwd: dir.path });
    writeFileSync(join(dir.path, 'plain.raw'), Buffer.alloc(65536, 1));
    writeFileSync(join(dir.path, 'gone.raw'), Buffer.alloc(65536, 2));
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'gone.raw', '-F', 'raw', 'orphan.qcow2'], {
      cwd: dir.path,
    });
    rmSync(join(dir.path, 'gone.raw'));
  });
  afterAll(() => dir?.remove());

  const cli = (args: readonly string[], env?: NodeJS.ProcessEnv) =>
    qcow2(args, { cwd: dir.path, env: env === undefined ? undefined : { ...process.env, ...env } });

  test.each([
    ['missing file', ['info', 'nope.qcow2'], "qcow2: Could not open 'nope.qcow2': No such file or directory"],
    ['bad format name', ['info', '-f', 'vhdx', 'plain.raw'], "Unknown driver 'vhdx'"],
    ['unknown flag', ['map', '--bogus', 'plain.raw'], "qcow2: unknown option '--bogus'"],
    ['bad size', ['map', '--start-offset=1Q', 'plain.raw'], "Invalid start offset specified: '1Q'"],
    ['bad output', ['check', '--output=yaml', 'snap.qcow2'], "'yaml'"],
    [
      'unknown snapshot',
      ['convert', '-O', 'raw', '-l', 'snapshot.name=two', 'snap.qcow2', 'out.raw'],
      "qcow2: Failed to load snapshot: Can't find snapshot",
    ],
    ['unknown snapshot id', ['convert', '-s', '42', 'snap.qcow2', 'out.raw'], "Can't find snapshot"],
    ['unsupported output format', ['convert', '-O', 'vmdk', 'plain.raw', 'out.vmdk'], "output format 'vmdk'"],
    ['unknown command', ['frobnicate'], "qcow2: unknown command 'frobnicate'"],
    ['missing backing file', ['map', 'orphan.qcow2'], "qcow2: Could not open 'orphan.qcow2': open: "],
    ['missing backing file in a chain', ['info', '--backing-chain', 'orphan.qcow2'], 'gone.raw'],
  ])('%s: exit 1, one line, no stack trace', (_what, args, message) => {
    const result = cli(args);
    expect(result.status).toBe(1);
    expect(result.stdout).toBe('');
    expect(result.stderr).toContain(message);
    expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(result.stderr).not.toMatch(/\bat .*\.js/);
  });

  test('--debug and QCOW2_DEBUG=1 add the stack trace', () => {
    expect(cli(['--debug', 'info', 'nope.qcow2']).stderr).toMatch(/\n {4}at /);
    expect(cli(['info', 'nope.qcow2'], { QCOW2_DEBUG: '1' }).stderr).toMatch(/\n {4}at /);
  });

  test('--help lists the commands with examples; help SUBCOMMAND shows its flags', () => {
    const help = cli(['--help']);
    expect(help.status).toBe(0);
    for (const command of ['info', 'map', 'convert', 'check']) expect(help.stdout).toContain(command);
    expect(help.stdout).toContain('Examples:');
    const convertHelp = cli(['help', 'convert']);
    expect(convertHelp.status).toBe(0);
    for (const flag of ['-O <fmt>', '-l <snapshot>', '-s <snapshot>', '-p', '--force-share']) {
      expect(convertHelp.stdout).toContain(flag);
    }
    const version = cli(['--version']);
    expect(version.status).toBe(0);
    expect(version.stdout).toMatch(/^\d+\.\d+\.\d+\n$/);
  });

  test('an image another process has open for writing: refused without -U, read with -U', async () => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'busy.qcow2', '1M'], { cwd: dir.path });
    // qemu-io holds the image's write lock while it sleeps (long enough for a loaded machine); killed
    // below. On a loaded machine it can be slow to start or lose the race: start it again then.
    let holder = spawn('qemu-io', ['-c', 'sleep 120000', 'busy.qcow2'], { cwd: dir.path, stdio: 'ignore' });
    try {
      // While qemu-io opens the image its locks change several times: wait until qemu-img has
      // been refused three times in a row.
      let refusals = 0;
      for (let tries = 0; tries < 300 && refusals < 3; tries++) {
        if (
          holder.exitCode !== null ||
          holder.signalCode !== null ||
          (tries > 0 && tries % 100 === 0 && refusals === 0)
        ) {
          holder.kill();
          holder = spawn('qemu-io', ['-c', 'sleep 120000', 'busy.qcow2'], { cwd: dir.path, stdio: 'ignore' });
        }
        const locked = runStatus('qemu-img', ['info', 'busy.qcow2'], { cwd: dir.path }).status !== 0;
        refusals = locked ? refusals + 1 : 0;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      expect(refusals).toBe(3);
      const refused = cli(['info', 'busy.qcow2']);
      expect(refused.status).toBe(1);
      expect(refused.stderr).toMatch(
        /^qcow2: Could not open 'busy.qcow2': Failed to get shared "write" lock/,
      );
      expect(refused.stderr.trimEnd().split('\n')).toHaveLength(1);
      const shared = cli(['info', '-U', '--output=json', 'busy.qcow2']);
      expect(shared.status, shared.stderr).toBe(0);
      expect(JSON.parse(shared.stdout)['virtual-size']).toBe(1048576);
    } finally {
      holder.kill();
    }
  });

  test('a reader that goes away early (| head) ends the command quietly', () => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'many.qcow2', '64M'], {
      cwd: dir.path,
    });
    const writes = Array.from({ length: 2000 }, (_, i) => ['-c', `write -P 1 ${i * 16384} 4096`]).flat();
    run('qemu-io', ['-f', 'qcow2', ...writes, 'many.qcow2'], { cwd: dir.path });
    const result = runStatus(
      'sh',
      ['-c', `"${process.execPath}" "${QCOW2_BIN}" map --output=json many.qcow2 | head -1`],
      {
        cwd: dir.path,
      },
    );
    expect(result.status).toBe(0);
    expect(result.stdout).toMatch(/^\[\{ "start": 0, /);
    expect(result.stderr).toBe('');
  });

  test('errors match the shape of qemu-img for the same mistakes', () => {
    const theirs = run('sh', ['-c', 'qemu-img info nope.qcow2 2>&1 || true'], { cwd: dir.path });
    expect(theirs).toContain("Could not open 'nope.qcow2'");
    expect(theirs).toContain('No such file or directory');
  });
});
