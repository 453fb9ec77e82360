// A short tour of the `qcow2` command (run by `pnpm demo` after the build): create an image,
// write into it through the library, then info, map, check, convert and compare, as an operator
// would with qemu-img. No QEMU binary is used. Then a tour of the block devices.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage } from '@qcowkit/qcow2-core/node';

const root = fileURLToPath(new URL('../../..', import.meta.url));
const bin = join(root, 'packages/qcow2-cli/dist/bin/qcow2.js');
const dir = mkdtempSync(join(tmpdir(), 'qcowkit-demo-'));
const disk = join(dir, 'disk.qcow2');

function qcow2(...args) {
  console.log(`$ qcow2 ${args.map((a) => a.replace(dir, '$DIR')).join(' ')}`);
  try {
    const out = execFileSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
    process.stdout.write(out.replaceAll(dir, '$DIR'));
  } catch (error) {
    process.stdout.write(String(error.stdout ?? '').replaceAll(dir, '$DIR'));
    console.log(`(exit ${error.status})`);
  }
  console.log();
}

try {
  qcow2('create', '-f', 'qcow2', '-o', 'cluster_size=65536', disk, '1G');

  console.log('# write 1 MiB of text at 0 and 64 KiB of zeros at 512 MiB through the library');
  const opened = await openImage(disk, { readOnly: false });
  await opened.device.write(0, new TextEncoder().encode('hello from qcowkit\n'.repeat(55189)));
  await opened.device.writeZeroes(512 << 20, 65536);
  await opened.close();
  console.log();

  qcow2('info', disk);
  qcow2('map', '--output=json', disk);
  qcow2('check', disk);
  qcow2('convert', '-O', 'raw', disk, join(dir, 'disk.raw'));
  qcow2('compare', disk, join(dir, 'disk.raw'));
  qcow2('snapshot', '-c', 'first', disk);
  qcow2('snapshot', '-l', disk);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

console.log('# and the block devices everything stands on:\n');
await import(join(root, 'packages/blockdev/examples/demo.mjs'));
