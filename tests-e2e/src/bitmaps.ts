/** What QEMU's tools say about an image's persistent dirty bitmaps: the oracle for bitmap tests. */
import { run, runStatus } from './tools.js';

/** The `bitmaps` list of `qemu-img info --output=json` for `file` (relative to `cwd`). */
export function qemuBitmapsInfo(file: string, cwd: string): unknown {
  const info = JSON.parse(runStatus('qemu-img', ['info', '--output=json', file], { cwd }).stdout) as {
    'format-specific': { data: { bitmaps?: unknown } };
  };
  return info['format-specific'].data.bitmaps;
}

/** The dirty bits qemu-nbd exports for bitmap `name` of `file`, as nbdinfo maps them. */
export function qemuDirtyMap(file: string, name: string, cwd: string): string {
  return run(
    'nbdinfo',
    [`--map=qemu:dirty-bitmap:${name}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', name, file, ']'],
    { cwd },
  );
}
