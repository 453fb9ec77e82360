/** Helpers for running QEMU's tools as the benchmark's "theirs" side. */
import { execFileSync, spawnSync } from 'node:child_process';

export function hasTool(name) {
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

/** Runs `qemu-img bench` and returns the seconds it reports for the run itself (process start-up
 * and image opening excluded, as on our side). */
export function qemuImgBench({ file, count, depth, size, step = size, offset = 0, write = false }) {
  const args = ['bench', '-f', 'raw', '-t', 'writeback', '-i', 'threads'];
  args.push('-c', String(count), '-d', String(depth), '-s', String(size), '-S', String(step));
  if (offset) args.push('-o', String(offset));
  if (write) args.push('-w');
  args.push(file);
  const out = execFileSync('qemu-img', args, { encoding: 'utf8' });
  const match = /Run completed in ([0-9.]+) seconds/.exec(out);
  if (!match) throw new Error(`qemu-img bench: unexpected output: ${out}`);
  return Number(match[1]);
}

/** Converts the raw file `raw` into the qcow2 image `image` with qemu-img (its default cluster
 * size unless `clusterSize` is given). */
export function qcow2FromRaw(raw, image, { clusterSize } = {}) {
  const options = clusterSize === undefined ? [] : ['-o', `cluster_size=${clusterSize}`];
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...options, raw, image]);
}
