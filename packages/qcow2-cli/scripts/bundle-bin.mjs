#!/usr/bin/env node
/**
 * Bundles a package's executable into `dist/bin/` with esbuild, after `tsc -b` has built the
 * library: `node scripts/bundle-bin.mjs --entry src/bin/qcow2.ts [--worker SPEC]... [--debug-arg=
 * --debug] [--debug-env NAME[=VALUE]]
 * [--metafile PATH]`, run in the package's folder (qcow2-cli's and qcow2-nbd's
 * `build` scripts run it).
 *
 * Why: Node resolves, reads and compiles every ES module of an unbundled command one by one (about
 * a hundred here), which cost more start-up time than the commands' work. One file per entry,
 * with the lazily imported subcommands kept lazy as split chunks, starts much faster.
 *
 * What the bundle needs beyond the obvious:
 * - `dist/bin/NAME.js` (NAME from the entry's file name) is a small generated stub: it turns
 *   source maps on when debugging was asked for (`--debug-arg` on the command line, or the
 *   `--debug-env` variable), then imports the real entry, which esbuild puts in a chunk. Source
 *   maps must be on before a module loads for its stack traces to point into `src/`; turning
 *   them on for every run would cost start-up time.
 * - CommonJS dependencies (commander) call `require` for Node's built-ins: every output file
 *   starts with a `require` made by `createRequire`.
 * - koffi (a native addon) stays external. blockdev loads it with `createRequire(import.meta.url)`,
 *   which in the bundle resolves from `dist/bin/`: the package lists koffi as its own dependency.
 * - A worker a library starts with `new URL('./WORKER.js', import.meta.url)` must exist next to
 *   the chunk that starts it: `--worker @scope/pkg/subpath:WORKER.js` bundles that file (found
 *   next to the subpath's resolved entry) as `dist/bin/WORKER.js`.
 * - `new URL('../../package.json', import.meta.url)` from a chunk in `dist/bin/` still names the
 *   package's own package.json, since every chunk lands in `dist/bin/`.
 * The library entries (`dist/index.js` and the rest) stay tsc's output.
 */
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { basename, dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { build } from 'esbuild';

const { values } = parseArgs({
  options: {
    entry: { type: 'string' },
    worker: { type: 'string', multiple: true, default: [] },
    'debug-arg': { type: 'string' },
    'debug-env': { type: 'string' },
    metafile: { type: 'string' },
  },
});
if (values.entry === undefined) {
  console.error('bundle-bin: --entry src/bin/NAME.ts is needed');
  process.exit(2);
}

const packageDir = process.cwd();
const outdir = join(packageDir, 'dist', 'bin');
const entry = resolve(packageDir, values.entry);
const name = basename(entry).replace(/\.[cm]?tsx?$|\.[cm]?js$/, '');
const requireHere = createRequire(join(packageDir, 'package.json'));

/** `@scope/pkg/subpath:worker.js` -> absolute path of worker.js next to the subpath's entry. */
function workerPath(spec) {
  const colon = spec.lastIndexOf(':');
  if (colon < 0) throw new Error(`bundle-bin: --worker ${spec}: expected MODULE:FILE.js`);
  const from = requireHere.resolve(spec.slice(0, colon));
  return join(dirname(from), spec.slice(colon + 1));
}

function debugCondition() {
  const tests = [];
  if (values['debug-arg'] !== undefined)
    tests.push(`process.argv.includes(${JSON.stringify(values['debug-arg'])})`);
  const env = values['debug-env'];
  if (env !== undefined) {
    const [variable, value] = env.split('=', 2);
    tests.push(
      value === undefined
        ? `process.env[${JSON.stringify(variable)}] !== undefined`
        : `process.env[${JSON.stringify(variable)}] === ${JSON.stringify(value)}`,
    );
  }
  return tests.length === 0 ? 'false' : tests.join(' || ');
}

const STUB = 'bundle-bin:stub';
const stub = {
  name: 'bin-stub',
  setup(esbuild) {
    esbuild.onResolve({ filter: /^bundle-bin:stub$/ }, () => ({ path: STUB, namespace: 'bin-stub' }));
    esbuild.onLoad({ filter: /.*/, namespace: 'bin-stub' }, () => ({
      contents: `#!/usr/bin/env node\nif (${debugCondition()}) process.setSourceMapsEnabled(true);\nawait import(${JSON.stringify(entry)});\n`,
      resolveDir: packageDir,
      loader: 'js',
    }));
  },
};

const entryPoints = [
  { in: 'bundle-bin:stub', out: name },
  ...values.worker.map((spec) => {
    const path = workerPath(spec);
    return { in: path, out: basename(path).replace(/\.js$/, '') };
  }),
];

// Built into a staging folder, then moved into dist/bin file by file (a rename is atomic), the
// entries last: a command started during a rebuild sees either the old files or the new ones.
const staging = join(packageDir, 'dist', `.bin-staging-${process.pid}`);
await rm(staging, { recursive: true, force: true });
const result = await build({
  entryPoints,
  outdir: staging,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  external: ['koffi'],
  sourcemap: 'linked',
  // Paths in the maps relative to the map: `src/...` of every workspace package.
  sourcesContent: false,
  chunkNames: 'chunk-[hash]',
  banner: {
    js: "import { createRequire as __bundleCreateRequire } from 'node:module';\nconst require = __bundleCreateRequire(import.meta.url);",
  },
  plugins: [stub],
  legalComments: 'none',
  metafile: values.metafile !== undefined,
  logLevel: 'warning',
});

await mkdir(outdir, { recursive: true });
const built = await readdir(staging);
const isEntry = (file) => !file.startsWith('chunk-');
for (const file of [...built.filter((f) => !isEntry(f)), ...built.filter(isEntry)]) {
  await rename(join(staging, file), join(outdir, file));
}
await rm(staging, { recursive: true, force: true });
await removeStaleChunks(new Set(built));

// `--metafile PATH`: what went into the bundle, for https://esbuild.github.io/analyze/.
if (values.metafile !== undefined) await writeFile(values.metafile, JSON.stringify(result.metafile));

/**
 * Chunks an earlier build made that this one did not: a command that started before this build
 * may still import them lazily, so each is removed only once it has been stale for a while
 * (STALE_GRACE_MS, counted from the build that first found it stale, kept in `.stale.json`).
 */
async function removeStaleChunks(current) {
  const STALE_GRACE_MS = 10 * 60 * 1000;
  const ledgerPath = join(outdir, '.stale.json');
  const ledger = JSON.parse(await readFile(ledgerPath, 'utf8').catch(() => '{}'));
  const now = Date.now();
  const next = {};
  for (const file of await readdir(outdir)) {
    if (!file.startsWith('chunk-') || current.has(file)) continue;
    const since = typeof ledger[file] === 'number' ? ledger[file] : now;
    if (now - since >= STALE_GRACE_MS) await rm(join(outdir, file), { force: true });
    else next[file] = since;
  }
  if (Object.keys(next).length > 0) await writeFile(ledgerPath, `${JSON.stringify(next)}\n`);
  else await rm(ledgerPath, { force: true });
}
