#!/usr/bin/env node
/**
 * qcowkit's benchmark runner: `pnpm bench [-- --filter NAME] [--rounds N]`.
 *
 * Every module in bench/jobs/ exports `jobs`: `{ name, description, tools?, theirsName?, setup(dir),
 * ours(ctx), theirs(ctx), teardown?(ctx) }` where `ours` and `theirs` each do the same work and
 * return the seconds it took (`theirsName` names the other side when it is not QEMU's, e.g.
 * nbdkit; `tools` lists the programs the job needs, and a job missing one is skipped). The runner works in a fresh directory on /dev/shm (memory-backed, so the
 * figures measure CPU cost, not a disk), alternates ours and theirs for several rounds, takes the
 * median of each, prints `job | ours | qemu | ratio` (ours / theirs: below 1 means we are
 * faster) beside the median and quartiles of the rounds' own ratios, and writes
 * bench/results.json.
 *
 * Start-up and NODE_EXTRA_CA_CERTS: Node reads and parses that CA bundle eagerly when a process
 * starts (about 50 ms for Debian's bundle on the bench machines, against 27 ms for the rest of
 * `node -e 0`), for TLS trust our tools never use. Machines that set it for a proxy would otherwise
 * charge every `qcow2` process with it, so the runner unsets it for every side it runs, says so,
 * and records it in results.json; `--keep-env` keeps it (to see what it costs).
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { hasTool } from './lib/qemu.mjs';

const here = dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const options = { filter: [], rounds: 3, keepEnv: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') continue;
    if (arg === '--filter') options.filter.push(argv[++i]);
    else if (arg.startsWith('--filter=')) options.filter.push(arg.slice('--filter='.length));
    else if (arg === '--rounds') options.rounds = Number(argv[++i]);
    else if (arg.startsWith('--rounds=')) options.rounds = Number(arg.slice('--rounds='.length));
    else if (arg === '--keep-env') options.keepEnv = true;
    else if (arg === '--help' || arg === '-h') {
      console.log('usage: pnpm bench [-- --filter NAME ...] [--rounds N] [--keep-env]');
      process.exit(0);
    } else {
      console.error(`bench: unknown argument ${arg}`);
      process.exit(2);
    }
  }
  if (!Number.isInteger(options.rounds) || options.rounds < 1) {
    console.error('bench: --rounds needs a positive integer');
    process.exit(2);
  }
  return options;
}

async function loadJobs() {
  const dir = join(here, 'jobs');
  const files = (await readdir(dir)).filter((f) => f.endsWith('.mjs')).sort();
  const jobs = [];
  for (const file of files) {
    const module = await import(pathToFileURL(join(dir, file)).href);
    for (const job of module.jobs ?? []) jobs.push({ ...job, module: file });
  }
  return jobs;
}

/** JSON laid out as the repository's formatter lays it out (flat arrays on one line), so
 * `pnpm lint` stays clean after a run. */
function toJson(value) {
  const text = JSON.stringify(value, (_key, v) => (typeof v === 'number' ? Number(v.toPrecision(6)) : v), 2);
  const scalar = String.raw`(?:"[^"\n]*"|[-+.\deE]+)`;
  const flat = new RegExp(String.raw`\[\s+(${scalar}(?:,\s+${scalar})*)\s+\]`, 'g');
  return `${text.replace(flat, (_m, body) => `[${body.split(/,\n\s*/).join(', ')}]`)}\n`;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function formatSeconds(s) {
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

/** The `q` quantile (0-1) of `values`, interpolated between the two nearest. */
function quantile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (sorted.length - 1) * q;
  const low = Math.floor(at);
  const high = Math.ceil(at);
  return sorted[low] + (sorted[high] - sorted[low]) * (at - low);
}

function table(rows) {
  const header = ['job', 'ours', 'qemu', 'ratio (ours/theirs)', 'round ratios: median (quartiles)'];
  const cells = [header, ...rows];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => String(r[i]).length)));
  const line = (r) => r.map((c, i) => String(c).padEnd(widths[i])).join(' | ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('-|-'), ...rows.map(line)].join('\n');
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const all = await loadJobs();
  const jobs = options.filter.length
    ? all.filter((job) => options.filter.some((f) => job.name.includes(f)))
    : all;
  if (jobs.length === 0) {
    console.error(
      `bench: no job matches ${options.filter.join(', ')} (jobs: ${all.map((j) => j.name).join(', ')})`,
    );
    process.exit(2);
  }

  // Children (ours and theirs alike) inherit process.env: see the note at the top.
  // biome-ignore lint/suspicious/noUndeclaredEnvVars: the bench runs outside turbo
  const caBundle = process.env.NODE_EXTRA_CA_CERTS;
  const unsetEnv = !options.keepEnv && caBundle !== undefined ? ['NODE_EXTRA_CA_CERTS'] : [];
  for (const name of unsetEnv) delete process.env[name];

  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = await mkdtemp(join(base, 'qcowkit-bench-'));
  console.log(`qcowkit bench: ${jobs.length} job(s), ${options.rounds} round(s) each, alternating ours/qemu`);
  console.log(
    base === '/dev/shm'
      ? `working in ${dir} (memory-backed /dev/shm: figures measure CPU cost, not a disk)`
      : `working in ${dir} (/dev/shm is missing: figures include the disk)`,
  );
  console.log(`node ${process.version}, ${cpus().length} CPU(s): ${cpus()[0]?.model ?? 'unknown'}`);
  if (unsetEnv.length > 0) {
    console.log(
      `NODE_EXTRA_CA_CERTS unset for every process run (Node would load ${caBundle} at each start-up; --keep-env keeps it)`,
    );
  }
  console.log('');

  const results = [];
  const rows = [];
  let failures = 0;
  try {
    for (const job of jobs) {
      const missing = (job.tools ?? []).filter((t) => !hasTool(t));
      if (missing.length) {
        console.log(`${job.name}: skipped, needs ${missing.join(', ')}`);
        results.push({ name: job.name, skipped: `needs ${missing.join(', ')}` });
        continue;
      }
      let ctx;
      try {
        ctx = await job.setup(dir);
        const ours = [];
        const theirs = [];
        for (let round = 0; round < options.rounds; round++) {
          // Alternate which side goes first so drift on a shared machine hits both alike.
          if (round % 2 === 0) {
            ours.push(await job.ours(ctx));
            theirs.push(await job.theirs(ctx));
          } else {
            theirs.push(await job.theirs(ctx));
            ours.push(await job.ours(ctx));
          }
        }
        const o = median(ours);
        const t = median(theirs);
        const ratio = o / t;
        // Each round's two runs side by side: on a machine whose speed drifts (a shared VM), the
        // median of these ratios moves less than the ratio of the two medians, and the quartiles
        // say how far a single round may stray.
        const roundRatios = ours.map((value, index) => value / theirs[index]);
        const paired = {
          median: median(roundRatios),
          q1: quantile(roundRatios, 0.25),
          q3: quantile(roundRatios, 0.75),
        };
        const theirsName = job.theirsName ?? 'qemu';
        const theirsCell = theirsName === 'qemu' ? formatSeconds(t) : `${formatSeconds(t)} (${theirsName})`;
        rows.push([
          job.name,
          formatSeconds(o),
          theirsCell,
          ratio.toFixed(2),
          `${paired.median.toFixed(2)} (${paired.q1.toFixed(2)}-${paired.q3.toFixed(2)})`,
        ]);
        results.push({
          name: job.name,
          description: job.description,
          theirsName,
          ours,
          theirs,
          oursMedian: o,
          theirsMedian: t,
          ratio,
          roundRatios: paired,
        });
        console.log(
          `${job.name}: ours ${formatSeconds(o)}, ${theirsName} ${formatSeconds(t)}, ratio ${ratio.toFixed(2)}  (${job.description})`,
        );
      } catch (error) {
        // One broken job is reported and the others still run; the exit code says so.
        failures++;
        console.log(`${job.name}: FAILED: ${error instanceof Error ? error.message : String(error)}`);
        rows.push([job.name, 'failed', 'failed', '-', '-']);
        results.push({ name: job.name, failed: String(error instanceof Error ? error.message : error) });
      } finally {
        if (ctx !== undefined) await job.teardown?.(ctx);
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }

  console.log(`\n${table(rows)}\n`);
  const out = join(here, 'results.json');
  const report = {
    date: new Date().toISOString(),
    node: process.version,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model,
    workDir: base,
    rounds: options.rounds,
    unsetEnv,
    jobs: results,
  };
  await writeFile(out, toJson(report));
  console.log(`results written to ${out}`);
  if (failures > 0) process.exitCode = 1;
}

await main();
