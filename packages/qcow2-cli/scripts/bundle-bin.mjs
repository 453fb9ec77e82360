#!/usr/bin/env node
/**
 * Bundles a package's executable into `dist/bin/` with esbuild, after `tsc -b` has built the
 * library: `node scripts/bundle-bin.mjs --entry src/bin/qcow2.ts [--worker SPEC]... [--debug-arg=
 * --debug] [--debug-env NAME[=VALUE]] [--code-cache [--command NAME=ENTRY]... [--cache-variant
 * NAME=OPTION:VALUE[,VALUE]... | NAME=OPTION|OPTION...]...] [--metafile PATH]`, run in the
 * package's folder (qcow2-cli's and qcow2-nbd's `build` scripts run it).
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
 *
 * `--code-cache`: the entry becomes one CommonJS file, `dist/bin/NAME.bundle.cjs` (the workers
 * CommonJS files next to it), `dist/bin/package.json` makes the folder CommonJS, and the stub (a
 * CommonJS file: no ES module loader at start) runs the bundle through `node:vm` with a V8 code
 * cache (V8 flags set at run time would change the cache's key: none are), so a run
 * neither parses nor compiles the functions an earlier run of the same subcommand compiled
 * (Node 20 has no compile cache for ES modules). Measured on `qcow2 create`/`info`/`convert`:
 * ~35 ms less CPU per run than the split ES module bundle, half from loading one CommonJS file
 * instead of a graph of chunks, half from the cache. The cache:
 * - lives in `os.tmpdir()/qcowkit-code-cache-UID/` (a folder only its owner can write, checked
 *   before every read: a cache from someone else is never run), one file per bin, subcommand
 *   (the first argument), bundle hash, Node version and architecture;
 * - is written after the run (on 'beforeExit') when it was missing or V8 rejected it, to a
 *   temporary file renamed into place (concurrent runs each write a whole file; the last rename
 *   wins); then the caches of other builds of the bin are removed, but for those of the most
 *   recent other build while under a day old (two versions in use side by side keep theirs);
 * - is best effort: an unwritable or missing folder, a corrupt or foreign file only cost the
 *   cache, never the command; `QCOWKIT_CODE_CACHE=0` turns it off.
 * A debug run (see `--debug-arg`) loads the bundle with `require` instead, source maps on.
 */
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { build } from 'esbuild';

const { values } = parseArgs({
  options: {
    entry: { type: 'string' },
    worker: { type: 'string', multiple: true, default: [] },
    'debug-arg': { type: 'string' },
    'debug-env': { type: 'string' },
    metafile: { type: 'string' },
    'code-cache': { type: 'boolean', default: false },
    outdir: { type: 'string' },
    command: { type: 'string', multiple: true, default: [] },
    'cache-variant': { type: 'string', multiple: true, default: [] },
  },
});
if (values.entry === undefined) {
  console.error('bundle-bin: --entry src/bin/NAME.ts is needed');
  process.exit(2);
}

const packageDir = process.cwd();
// `--outdir DIR` (default dist/bin): a build elsewhere, to compare two bundles side by side.
const outdir = values.outdir !== undefined ? resolve(values.outdir) : join(packageDir, 'dist', 'bin');
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

const codeCache = values['code-cache'] === true;
/** `--command NAME=ENTRY` (with --code-cache): the subcommands built as bundles of their own. */
const commands = values.command.map((spec) => {
  const match = /^([a-z][a-z-]{0,23})=(.+)$/.exec(spec);
  if (match === null || !codeCache) {
    throw new Error(`bundle-bin: --command ${spec}: expected NAME=src/bin/ENTRY.ts, with --code-cache`);
  }
  return { command: match[1], path: resolve(packageDir, match[2]) };
});
/**
 * `--cache-variant NAME=OPTION:VALUE[,VALUE]...` (with --code-cache): lines of subcommand NAME whose
 * last OPTION is followed by one of the VALUEs get code caches of their own. A code cache holds the
 * functions the run that wrote it compiled, and is written once: `convert -O raw` and `convert -O
 * qcow2` run different code (the raw copy loop, the qcow2 writer), so one shared cache left the
 * other kind of line compiling its code at every start (~5 ms). Only the cache file's name
 * changes: the bundle is chosen by NAME alone, and parses the line itself.
 * `--cache-variant NAME=OPTION|OPTION...` (options without values): a line of NAME with one of these
 * options gets the cache of the first one listed it has. `snapshot -c`, `-a`, `-d` and `-l` run
 * different operations: with one shared cache, whichever ran first wrote it and the others
 * compiled their own functions lazily at every start (snapshot -c: ~85 M instructions of parsing
 * and compiling, about 25 ms of CPU, measured with valgrind).
 * A NAME may have several `--cache-variant`s: the first that matches the line names the cache.
 */
const cacheVariants = {};
for (const spec of values['cache-variant']) {
  const withValues = /^([a-z][a-z-]{0,23})=(-[A-Za-z]|--[a-z][a-z-]*):([a-z0-9]+(?:,[a-z0-9]+)*)$/.exec(spec);
  const flags =
    /^([a-z][a-z-]{0,23})=((?:-[A-Za-z]|--[a-z][a-z-]*)(?:\|(?:-[A-Za-z]|--[a-z][a-z-]*))*)$/.exec(spec);
  if ((withValues === null && flags === null) || !codeCache) {
    throw new Error(
      `bundle-bin: --cache-variant ${spec}: expected NAME=-O:VALUE[,VALUE]... or NAME=-a|-b..., with --code-cache`,
    );
  }
  const command = (withValues ?? flags)[1];
  const list = cacheVariants[command] ?? [];
  if (withValues !== null) list.push([withValues[2], withValues[3].split(',')]);
  else for (const option of flags[2].split('|')) list.push([option, null]);
  cacheVariants[command] = list;
}
const workerEntries = values.worker.map((spec) => {
  const path = workerPath(spec);
  return { in: path, out: basename(path).replace(/\.js$/, '') };
});
// With --code-cache the workers are CommonJS files next to the bundle (see buildCommonJs).
const entryPoints = codeCache ? [] : [{ in: 'bundle-bin:stub', out: name }, ...workerEntries];

// Built into a staging folder, then moved into dist/bin file by file (a rename is atomic), the
// entries last: a command started during a rebuild sees either the old files or the new ones.
const staging = join(packageDir, 'dist', `.bin-staging-${process.pid}`);
await rm(staging, { recursive: true, force: true });
/**
 * Built-in modules required when a bundle loads that few runs use get stand-ins that require the
 * real module on first use, for the importers named here only:
 * - node:child_process, which commander requires (~3 ms here) for executable subcommands, which
 *   no bin of ours has;
 * - node:worker_threads (~2-4 ms), which qcow2-writer's compression pool requires: only
 *   compressed conversions start workers (the workers themselves, built apart, get the real one).
 * Loading is deferred to the first read of a property (`import { Worker } from ...` becomes
 * `module.Worker` at each use in the CommonJS output).
 */
const LAZY_BUILTINS = [
  { module: 'child_process', importer: /[\\/]node_modules[\\/]commander[\\/]/ },
  { module: 'worker_threads', importer: /[\\/]qcow2-writer[\\/]dist[\\/]node[\\/]compress-pool\.js$/ },
];
const lazyBuiltins = {
  name: 'lazy-builtins',
  setup(esbuild) {
    for (const { module, importer } of LAZY_BUILTINS) {
      esbuild.onResolve({ filter: new RegExp(`^(node:)?${module}$`) }, (args) => {
        if (!importer.test(args.importer)) return undefined;
        return { path: module, namespace: 'lazy-builtin' };
      });
    }
    // The module's export names as this Node has them: an ES module importing it lists them
    // (esbuild's __toESM) without reading a value. Any read, of these names or others, loads it.
    esbuild.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, (args) => ({
      contents:
        `let real;\nconst load = () => (real ??= require(${JSON.stringify(`node:${args.path}`)}));\n` +
        `const names = {};\nfor (const key of ${JSON.stringify(Object.keys(requireHere(`node:${args.path}`)))}) ` +
        'Object.defineProperty(names, key, { get: () => load()[key], enumerable: true });\n' +
        'module.exports = new Proxy(names, { get: (_, key) => load()[key], has: (_, key) => key in load() });\n',
      loader: 'js',
    }));
  },
};

/**
 * In the CommonJS bundle, `createRequire` (how blockdev's libc.ts loads koffi) comes from
 * scripts/koffi-stand-in.cjs, whose `require('koffi')` loads koffi's prebuilt binary directly where
 * it can and goes through koffi's entry otherwise (that file says why and when). Only blockdev's
 * libc.js gets the stand-in (it imports createRequire alone from node:module).
 */
const KOFFI_STAND_IN = fileURLToPath(new URL('./koffi-stand-in.cjs', import.meta.url));
const fastKoffi = {
  name: 'fast-koffi',
  setup(esbuild) {
    let used = false;
    esbuild.onResolve({ filter: /^(node:)?module$/ }, (args) => {
      if (args.namespace !== 'file' || !/[\\/]blockdev[\\/]dist[\\/]node[\\/]libc\.js$/.test(args.importer)) {
        return undefined;
      }
      used = true;
      return { path: 'module', namespace: 'fast-koffi' };
    });
    esbuild.onEnd(() => {
      if (!used)
        console.warn(
          'bundle-bin: blockdev no longer imports node:module in libc.js: koffi loads the slow way',
        );
    });
    esbuild.onLoad({ filter: /.*/, namespace: 'fast-koffi' }, async () => ({
      contents: await readFile(KOFFI_STAND_IN, 'utf8'),
      loader: 'js',
      resolveDir: packageDir,
    }));
    // libc.js hands the stand-in the bundle's own file name rather than `import.meta.url`, whose
    // stand-in here makes a file: URL first (~0.2 ms of every start that opens a file).
    esbuild.onLoad({ filter: /[\\/]blockdev[\\/]dist[\\/]node[\\/]libc\.js$/ }, async (args) => {
      const code = await readFile(args.path, 'utf8');
      const call = 'createRequire(import.meta.url)';
      if (!code.includes(call)) {
        console.warn(`bundle-bin: blockdev's libc.js no longer calls ${call}: it gets a file: URL`);
        return undefined;
      }
      return {
        contents: code.replaceAll(call, 'createRequire(__filename)'),
        loader: 'js',
        resolveDir: dirname(args.path),
      };
    });
  },
};

/**
 * Big dependencies few runs need, kept out of the CommonJS bundle: each becomes its own CommonJS
 * file next to it (`dist/bin/NAME.cjs`), required when first imported. Every start reads the whole
 * bundle (~1 ms per MB); zstd's WebAssembly build (~240 KB, mostly the module as one string) is
 * needed only to write zstd-compressed clusters (reading them uses fzstd).
 */
/**
 * How esbuild resolves `args` without the plugin that asks (`marker`, given back to it as
 * pluginData so it declines): a plugin that only adjusts the usual resolution starts from this.
 */
function resolveAsUsual(esbuild, args, marker) {
  return esbuild.resolve(args.path, {
    kind: args.kind,
    resolveDir: args.resolveDir,
    importer: args.importer,
    pluginData: marker,
  });
}
const SEPARATE_MODULES = new Map([['@hpcc-js/wasm-zstd', 'hpcc-wasm-zstd']]);
const separateModules = {
  name: 'separate-modules',
  setup(esbuild) {
    const filter = new RegExp(
      `^(${[...SEPARATE_MODULES.keys()].map((id) => id.replace(/[/.]/g, '\\$&')).join('|')})$`,
    );
    esbuild.onResolve({ filter }, async (args) => {
      if (args.pluginData === 'separate-modules') return undefined;
      const resolved = await resolveAsUsual(esbuild, args, 'separate-modules');
      if (resolved.errors.length > 0) return { errors: resolved.errors };
      separated.set(SEPARATE_MODULES.get(args.path), resolved.path);
      return { path: `./${SEPARATE_MODULES.get(args.path)}.cjs`, external: true };
    });
  },
};
/** out name -> resolved entry of each separate module the bundle imports. */
const separated = new Map();

/**
 * A subcommand's own bundle (`--command`) holds what that subcommand's plain command lines run, and
 * no more: every start reads the whole bundle and deserializes a code cache that holds a record of
 * every top-level function in it, run or not. Two things keep it small:
 * - the workspace packages are taken as free of side effects when imported (none of their modules
 *   does anything on import but define things), so what the entry does not use of a package's
 *   index is left out;
 * - `import()` in this package's own src/ (how the CLI loads the parts a command line may need, the
 *   image engine for one) is left out: the entry declines the command lines that need those parts
 *   and the stub runs the whole CLI's bundle for them. Reached anyway, such an import fails with
 *   an error naming it.
 */
const workspaceWithoutSideEffects = {
  name: 'workspace-without-side-effects',
  setup(esbuild) {
    esbuild.onResolve({ filter: /^@qcowkit\// }, async (args) => {
      if (args.pluginData === 'workspace-without-side-effects') return undefined;
      const resolved = await resolveAsUsual(esbuild, args, 'workspace-without-side-effects');
      if (resolved.errors.length > 0) return { errors: resolved.errors };
      return { ...resolved, sideEffects: false };
    });
  },
};
const OWN_SOURCES = join(packageDir, 'src');
const ownImportsLeftOut = {
  name: 'own-imports-left-out',
  setup(esbuild) {
    esbuild.onResolve({ filter: /.*/ }, (args) =>
      args.kind === 'dynamic-import' && args.importer.startsWith(`${OWN_SOURCES}/`)
        ? { path: args.path, namespace: 'left-out', pluginData: args.importer }
        : undefined,
    );
    esbuild.onLoad({ filter: /.*/, namespace: 'left-out' }, (args) => ({
      contents: `throw new Error(${JSON.stringify(
        `bundle-bin: ${args.path} (imported by ${args.pluginData.slice(packageDir.length + 1)}) is not in this command's bundle`,
      )});\n`,
      loader: 'js',
    }));
  },
};

const metafiles = [];
if (entryPoints.length > 0) metafiles.push((await buildEsm()).metafile);
if (codeCache) metafiles.push((await buildCommonJs()).metafile);

async function buildEsm() {
  return await build({
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
}

/**
 * `--code-cache`: the entry as one CommonJS file, the workers as CommonJS files next to it, and the
 * stub that runs the bundle from the cache. `dist/bin/package.json` makes the folder CommonJS:
 * Node then starts `NAME.js` without its ES module loader (~5 ms of every run, measured on
 * `qcow2 --version`).
 */
async function buildCommonJs() {
  /** What every CommonJS file of the build shares (the bundle, the workers, separate modules). */
  const commonJs = {
    outdir: staging,
    outExtension: { '.js': '.cjs' },
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    sourcemap: 'linked',
    sourcesContent: false,
    // The file's own URL for the libraries' `new URL(..., import.meta.url)` (workers,
    // package.json) and `createRequire(import.meta.url)` (koffi): every file sits in dist/bin as
    // the chunks of the ES module build do.
    define: { 'import.meta.url': '__bundleMeta.url' },
    // import() becomes require(): a vm.Script's dynamic import needs an experimental loader hook
    // (a warning on stderr), and functions that come from the code cache lose it (the import fails).
    supported: { 'dynamic-import': false },
    // Minified (the source map maps positions and names back to src/): 393 KB instead of 627 KB
    // to read at every start, and a code cache a tenth smaller to deserialize (the cache holds a
    // function record, name included, for every top-level function of the bundle, run or not):
    // ~2 ms less CPU per run, measured on `qcow2 create`. Nothing here relies on function or class
    // names (errors set their own `name`; commander's CommanderError names itself after its
    // class, which no output shows).
    minifyWhitespace: true,
    minifyIdentifiers: true,
    minifySyntax: true,
    // Made on first use: most runs never ask (pathToFileURL is ~0.2 ms of a start).
    banner: {
      js: "var __bundleMeta = { get url() { return (this.href ??= require('node:url').pathToFileURL(__filename).href); } };",
    },
    legalComments: 'none',
    logLevel: 'warning',
  };
  const result = await build({
    ...commonJs,
    entryPoints: [{ in: entry, out: `${name}.bundle` }, ...workerEntries],
    external: ['koffi'],
    plugins: [lazyBuiltins, fastKoffi, separateModules],
    metafile: values.metafile !== undefined,
  });
  const metafiles = [result.metafile];
  // `--command NAME=ENTRY`: NAME's own bundle (see commandBundles).
  for (const { command, path } of commands) {
    const own = await build({
      ...commonJs,
      entryPoints: [{ in: path, out: `${name}-${command}.bundle` }],
      external: ['koffi'],
      plugins: [lazyBuiltins, fastKoffi, separateModules, workspaceWithoutSideEffects, ownImportsLeftOut],
      metafile: values.metafile !== undefined,
    });
    metafiles.push(own.metafile);
  }
  for (const [out, path] of separated) await build({ ...commonJs, entryPoints: [{ in: path, out }] });
  // Workers keep the name the library starts them by (`new URL('./WORKER.js', import.meta.url)`):
  // `.js`, CommonJS by dist/bin/package.json.
  for (const { out } of workerEntries) {
    const code = await readFile(join(staging, `${out}.cjs`), 'utf8');
    await writeFile(
      join(staging, `${out}.js`),
      code.replace(/\n\/\/# sourceMappingURL=.*\n?$/, `\n//# sourceMappingURL=${out}.js.map\n`),
    );
    await rename(join(staging, `${out}.cjs.map`), join(staging, `${out}.js.map`));
    await rm(join(staging, `${out}.cjs`));
  }
  // One hash for the build: every bundle's cache files carry it.
  const hasher = createHash('sha256');
  for (const bundleName of [
    `${name}.bundle.cjs`,
    ...commands.map(({ command }) => `${name}-${command}.bundle.cjs`),
  ]) {
    hasher.update(await finishBundle(bundleName));
  }
  const hash = hasher.digest('hex').slice(0, 16);
  await writeFile(join(staging, 'package.json'), '{ "type": "commonjs" }\n');
  const own = Object.fromEntries(commands.map(({ command }) => [command, `${name}-${command}.bundle.cjs`]));
  await writeFile(join(staging, `${name}.js`), cachedStub(`${name}.bundle.cjs`, own, hash), { mode: 0o755 });
  return { metafile: mergeMetafiles(metafiles) };
}

/** Checks a bundle the stub runs through the code cache and returns its final text. */
async function finishBundle(bundleName) {
  const bundlePath = join(staging, bundleName);
  // The entry's `#!` line (kept by esbuild) is no JavaScript inside the function wrapper the
  // stub puts around the bundle: made a comment, the same length, so the source map still fits.
  let code = await readFile(bundlePath, 'utf8');
  if (code.startsWith('#!')) code = `//${code.slice(2)}`;
  if (/\bimport\(/.test(code.replace(/\/\/.*|\/\*[\s\S]*?\*\//g, ''))) {
    throw new Error(`bundle-bin: ${bundleName} still has an import(), which the code cache cannot run`);
  }
  // The stub reads the bundle as latin1 (no UTF-8 decoding): esbuild escapes every other character.
  if (/[^ -~\t\n\r]/.test(code)) throw new Error(`bundle-bin: ${bundleName} is not ASCII`);
  await writeFile(bundlePath, code, { mode: 0o644 });
  return code;
}

function mergeMetafiles(list) {
  const present = list.filter((metafile) => metafile !== undefined);
  if (present.length === 0) return undefined;
  return {
    inputs: Object.assign({}, ...present.map((metafile) => metafile.inputs)),
    outputs: Object.assign({}, ...present.map((metafile) => metafile.outputs)),
  };
}

/**
 * The CommonJS stub of `--code-cache` (kept small: it is compiled at every start). `own` maps the
 * subcommands built as bundles of their own to their files: such a bundle runs first, and when it
 * exports `declined: true` (a command line it leaves to the whole CLI) the main bundle runs.
 */
function cachedStub(bundleName, own, hash) {
  return `#!/usr/bin/env node
// Generated by scripts/bundle-bin.mjs --code-cache: runs ${bundleName} with a V8 code cache.
'use strict';
const { lstatSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } = require('node:fs');
const { join } = require('node:path');

const debug = ${debugCondition()};
if (debug) process.setSourceMapsEnabled(true);
const command = /^[a-z][a-z-]{0,23}$/.test(process.argv[2] ?? '') ? process.argv[2] : '_';
const own = ${JSON.stringify(own)}[command];
// The code cache's name: the subcommand, and its first variant option present on the line (with
// its value, for an option declared with values).
let key = command;
for (const [option, values] of ${JSON.stringify(cacheVariants)}[command] ?? []) {
  const at = process.argv.lastIndexOf(option);
  if (at <= 2) continue;
  if (values === null) {
    key += option;
    break;
  }
  if (values.includes(process.argv[at + 1])) {
    key += \`\${option}-\${process.argv[at + 1]}\`;
    break;
  }
}
// A bundle of one subcommand, then (when it declined the command line) the whole CLI's.
const run = (load) => {
  if (own !== undefined && load(own, \`\${key}.own\`).declined !== true) return;
  load(${JSON.stringify(bundleName)}, key);
};
if (debug || process.env.QCOWKIT_CODE_CACHE === '0') {
  run((name) => require(join(__dirname, name)));
} else {
  const { Script } = require('node:vm');
  const uid = typeof process.getuid === 'function' ? process.getuid() : -1;
  // os.tmpdir() without loading node:os (~0.3 ms): TMPDIR, TMP, TEMP or /tmp, no trailing slash.
  // Node ignores those variables in a set-user-ID or set-group-ID process: then ask it.
  const tmpdir = () => {
    if (uid < 0 || uid !== process.geteuid() || process.getgid() !== process.getegid()) {
      return require('node:os').tmpdir();
    }
    const { TMPDIR, TMP, TEMP } = process.env;
    const path = TMPDIR || TMP || TEMP || '/tmp';
    return path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path;
  };
  const dir = join(tmpdir(), \`qcowkit-code-cache-\${uid}\`);
  const prefix = ${JSON.stringify(`${name}-`)};
  const hash = ${JSON.stringify(hash)};
  // Only a folder of our own that nobody else can write is trusted.
  const ours = () => {
    const stat = lstatSync(dir);
    return stat.isDirectory() && (uid < 0 || stat.uid === uid) && (stat.mode & 0o022) === 0;
  };
  let trusted;
  // Runs bundle \`name\` from the cache file of \`key\`; returns its exports.
  const load = (name, key) => {
    const file = join(__dirname, name);
    const cacheFile = join(dir, \`\${prefix}\${hash}-\${process.version}-\${process.arch}-\${key}.v8\`);
    let cachedData;
    try {
      trusted ??= ours();
      if (trusted) cachedData = readFileSync(cacheFile);
    } catch {}
    const source = readFileSync(file, 'latin1');
    const script = new Script(\`(function (exports, require, module, __filename, __dirname) { \${source}\n});\`, {
      filename: file,
      cachedData,
    });
    const module = { exports: {} };
    script.runInThisContext().call(module.exports, module.exports, require, module, file, __dirname);
    // A bundle that declined ran none of the command's code: its cache waits for a run that does.
    if ((cachedData === undefined || script.cachedDataRejected === true) && module.exports.declined !== true) {
      process.once('beforeExit', () => writeCache(script, cacheFile));
    }
    return module.exports;
  };
  const writeCache = (script, cacheFile) => {
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      if (!ours()) return;
      const temporary = \`\${cacheFile}.\${process.pid}.tmp\`;
      writeFileSync(temporary, script.createCachedData(), { mode: 0o600 });
      renameSync(temporary, cacheFile);
      // Other builds' caches: those of the most recently written other build are kept for a
      // day (two installed versions in use side by side each keep theirs; removed at once, they
      // would replace each other's at every run), all older builds' go (rebuilds add up).
      const others = new Map();
      for (const name of readdirSync(dir)) {
        if (!name.startsWith(prefix) || name.startsWith(\`\${prefix}\${hash}-\`) || !name.endsWith('.v8')) continue;
        const build = name.slice(prefix.length, prefix.length + hash.length);
        const path = join(dir, name);
        const entry = others.get(build) ?? { paths: [], newest: 0 };
        entry.paths.push(path);
        entry.newest = Math.max(entry.newest, statSync(path).mtimeMs);
        others.set(build, entry);
      }
      const newest = [...others.values()].sort((a, b) => b.newest - a.newest);
      for (const [index, entry] of newest.entries()) {
        if (index === 0 && entry.newest > Date.now() - 86_400_000) continue;
        for (const path of entry.paths) unlinkSync(path);
      }
    } catch {}
  };
  run(load);
}
`;
}

await mkdir(outdir, { recursive: true });
const built = await readdir(staging);
// Chunks first, the bin's own file (`NAME.js`, what users start) last.
const rank = (file) => (file.startsWith('chunk-') ? 0 : file === `${name}.js` ? 2 : 1);
for (const file of [...built].sort((a, b) => rank(a) - rank(b))) {
  await rename(join(staging, file), join(outdir, file));
}
await rm(staging, { recursive: true, force: true });
await removeStaleChunks(new Set(built));

// `--metafile PATH`: what went into the bundle, for https://esbuild.github.io/analyze/.
if (values.metafile !== undefined) {
  const inputs = Object.assign({}, ...metafiles.map((metafile) => metafile.inputs));
  const outputs = Object.assign({}, ...metafiles.map((metafile) => metafile.outputs));
  await writeFile(values.metafile, JSON.stringify({ inputs, outputs }));
}

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
