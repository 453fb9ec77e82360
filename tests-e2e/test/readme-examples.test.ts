/**
 * The READMEs' examples, as a user who copies them gets them (tests-e2e/src/readme-examples.ts
 * extracts them; its header explains the `<!-- example: ... -->` markers):
 *
 * - every ```ts / ```js block is typechecked against the built packages' public entries;
 * - every block is run with Node in a folder of its own (`/tmp/` and `/dev/shm/` in its code moved
 *   into that folder), after FIXTURES below has made the files it opens (with qemu-img), and must
 *   exit 0 by itself; FIXTURES also checks what the README says it prints or leaves, talks to the
 *   servers it starts, and names the few blocks that are only typechecked, with the reason;
 * - every `qcow2 ...` / `qcow2-nbd ...` command line in a ```sh block or a synopsis uses flags the
 *   command accepts (its --help lists them).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type CliIo, run as runCli } from '@qcowkit/qcow2-cli';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  assemble,
  extractCommands,
  extractExamples,
  extractFlagTable,
  flagsInHelp,
  type ReadmeCommand,
  type ReadmeExample,
  readmeFiles,
  toRunnableModule,
  typecheckExamples,
} from '../src/readme-examples.js';
import { requireTools, run } from '../src/tools.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** stdout as latin1 (bytes preserved: an example may write an image to stdout). */
  stdout: string;
  stderr: string;
}

interface RunningExample {
  dir: string;
  child: ChildProcess;
  /** Resolves once stdout has printed a line matching `pattern`. */
  waitForOutput(pattern: RegExp): Promise<void>;
}

interface Fixture {
  /** The block is typechecked, never run: why. */
  typecheckOnly?: string;
  /** Code before / after the block, typechecked and run with it (declarations, assertions). */
  before?: string;
  after?: string;
  /** Typecheck: where the block sits in its folder (default example.ts/.js) and files beside it. */
  path?: string;
  files?: Record<string, string>;
  /** Tools the run needs besides Node. */
  tools?: string[];
  /** Makes the files the example opens, in its folder (its working folder). */
  setup?: (dir: string) => void | Promise<void>;
  /** Text replaced in the code before it runs (e.g. a URL for a server the test started). */
  replace?: () => Promise<Record<string, string>>;
  /** While the example runs, e.g. talk to its server and stop it. */
  whileRunning?: (running: RunningExample) => Promise<void>;
  /** After the example exited 0: what the README says it prints or leaves. */
  check?: (result: RunResult, dir: string) => void | Promise<void>;
}

const qemuImg = (dir: string, ...args: string[]) => run('qemu-img', args, { cwd: dir });
const qemuIo = (dir: string, ...args: string[]) => run('qemu-io', args, { cwd: dir });

/** A qcow2 image of `size` with 1 MiB of 0x11 at 1 MiB (qemu-img and qemu-io). */
function makeQcow2(dir: string, name = 'disk.qcow2', size = '64M'): void {
  qemuImg(dir, 'create', '-q', '-f', 'qcow2', name, size);
  qemuIo(dir, '-f', 'qcow2', '-c', 'write -q -P 0x11 1M 1M', name);
}

/** A raw file of `size` with 1 MiB of 0x22 at 1 MiB. */
function makeRaw(dir: string, name = 'disk.raw', size = '16M'): void {
  qemuImg(dir, 'create', '-q', '-f', 'raw', name, size);
  qemuIo(dir, '-f', 'raw', '-c', 'write -q -P 0x22 1M 1M', name);
}

/** A receiver for the writer example's HTTP upload; keeps the last body. */
const upload = (() => {
  let received: Buffer | undefined;
  let contentLength: string | undefined;
  const server = createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      received = Buffer.concat(chunks);
      contentLength = request.headers['content-length'];
      response.end('stored\n');
    });
  });
  let listening: Promise<string> | undefined;
  return {
    url: () =>
      (listening ??= new Promise((resolveUrl) =>
        server.listen(0, '127.0.0.1', () =>
          resolveUrl(`http://127.0.0.1:${(server.address() as AddressInfo).port}`),
        ),
      )),
    last: () => ({ received, contentLength }),
    close: () => server.close(),
  };
})();

/**
 * What each block needs, by key (`FILE § HEADING`, ` (2)` for a section's second block). A block
 * without an entry runs in an empty folder and must exit 0.
 */
const FIXTURES: Record<string, Fixture> = {
  'README.md § The BlockDevice interface': {
    typecheckOnly:
      'a declaration; it must declare exactly the members and parameters of the exported interface',
    before:
      "import type { BlockDevice as Exported, BlockDeviceCapabilities, Extent, RequestOptions, WriteOptions, WriteZeroesOptions } from '@qcowkit/blockdev';",
    after: [
      'type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;',
      'type Member<T, K extends keyof T> = T[K] extends (...args: infer P) => infer R ? [P, R] : T[K];',
      'type Members<T> = { [K in keyof T]-?: Member<T, K> };',
      'const sameMembers: Same<Members<BlockDevice>, Members<Exported>> = true;',
      'const sameKeys: Same<keyof BlockDevice, keyof Exported> = true;',
      'void sameMembers, sameKeys;',
    ].join('\n'),
  },
  'README.md § Plugging in your own BlockDevice': {
    tools: ['qemu-img', 'qemu-io'],
    async whileRunning({ dir, child, waitForOutput }) {
      await waitForOutput(/serving on/);
      const socket = `${dir}/tmp/custom.sock`;
      expect(qemuImg(dir, 'info', `nbd+unix:///file?socket=${socket}`)).toMatch(/file format: qcow2/);
      expect(qemuImg(dir, 'check', '-f', 'qcow2', `nbd+unix:///file?socket=${socket}`)).toMatch(
        /No errors were found on the image/,
      );
      expect(qemuIo(dir, '-f', 'raw', '-c', 'read -v 1M 32', `nbd+unix:///disk?socket=${socket}`)).toMatch(
        /^00100000: {2}68 65 6c 6c 6f 20 66 72 6f 6d 20 61 20 63 75 73 {2}hello.from.a.cus$/m,
      );
      child.kill('SIGINT');
    },
    check: ({ stdout }) => expect(stdout).toMatch(/^hello from a custom device$/m),
  },
  'packages/blockdev/README.md § Example': {
    check: ({ stdout }) => expect(stdout).toMatch(/^boot OVERLAY\nboot sector\n/),
  },
  'packages/blockdev/README.md § The conformance kit (`@qcowkit/blockdev/testing`)': {
    typecheckOnly:
      'it registers vitest suites for a device of yours (the kit runs on every device of this repo)',
    path: 'test/my-device.test.ts',
    files: {
      'src/my-device.ts': [
        "import { MemoryBlockDevice } from '@qcowkit/blockdev';",
        'export declare class MyDevice extends MemoryBlockDevice {',
        '  readonly location: string;',
        '  static create(size: number): Promise<MyDevice>;',
        '  static open(location: string): Promise<MyDevice>;',
        '  static fromBytes(content: Uint8Array, options: { readOnly: boolean }): Promise<MyDevice>;',
        '}',
      ].join('\n'),
    },
  },
  'packages/blockdev/README.md § ConcatBlockDevice': {
    check: ({ stdout }) => expect(stdout).toMatch(/^rtse 1$/m),
  },
  'packages/blockdev/README.md § The conformance kit (`@qcowkit/blockdev/testing`) (2)': {
    typecheckOnly: 'it registers vitest suites for a read-only device of yours',
    path: 'test/my-read-only-device.test.ts',
    files: {
      'src/my-read-only-device.ts': [
        "import { MemoryBlockDevice } from '@qcowkit/blockdev';",
        'export declare class MyReadOnlyDevice extends MemoryBlockDevice {',
        '  static fromBytes(content: Uint8Array): Promise<MyReadOnlyDevice>;',
        '}',
      ].join('\n'),
    },
  },
  'packages/blockdev/README.md § FileBlockDevice (`@qcowkit/blockdev/node`)': {
    check: ({ stdout }) => {
      expect(stdout).toMatch(/^0 4096 data\n4096 1099511619584 hole\n1099511623680 4096 data\n/);
      expect(stdout).toMatch(/^EBUSY /m);
    },
  },
  'packages/blockdev/README.md § Performance': {
    setup: (dir) => writeFileSync(join(dir, 'shm/disk.raw'), new Uint8Array(1 << 20)),
  },
  'packages/blockdev/README.md § The libc binding (`loadLibc`)': {
    setup: (dir) => {
      writeFileSync(join(dir, 'shm/a.raw'), randomBytes(1 << 20));
      writeFileSync(join(dir, 'shm/b.raw'), new Uint8Array(1 << 20));
    },
    check: (_, dir) =>
      expect(readFileSync(join(dir, 'shm/b.raw')).equals(readFileSync(join(dir, 'shm/a.raw')))).toBe(true),
  },
  'packages/qcow2-cli/README.md § In-process use': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeQcow2(dir),
    check: ({ stdout }) => expect(stdout).toBe('0 67108864\n'),
  },
  'packages/qcow2-core/README.md § Reading an image from the file system': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => {
      makeQcow2(dir);
      qemuImg(dir, 'snapshot', '-c', 'before-upgrade', 'disk.qcow2');
    },
    check: ({ stdout }) => expect(stdout).toMatch(/name: 'before-upgrade'/),
  },
  'packages/qcow2-core/README.md § Using the engine on any BlockDevice': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => {
      makeRaw(dir, 'base.raw');
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'disk.qcow2');
    },
    check: ({ stdout }) => expect(stdout).toBe('3 65536 base.raw false\n'),
  },
  'packages/qcow2-core/README.md § Check, repair, snapshots and image operations (offline)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => {
      makeQcow2(dir, 'disk.qcow2', '1G');
      makeRaw(dir, 'base.raw', '1G'); // named as the new backing file at the end
    },
    check: (_, dir) => {
      const info = JSON.parse(qemuImg(dir, 'info', '--output=json', '-U', 'disk.qcow2'));
      expect(info['virtual-size']).toBe(10 * 2 ** 30);
      expect(info['backing-filename']).toBe('base.raw');
      expect(run('qemu-img', ['check', '-U', 'disk.qcow2'], { cwd: dir })).toMatch(/No errors/);
    },
  },
  'packages/qcow2-core/README.md § Check, repair, snapshots and image operations (offline) (2)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => {
      makeQcow2(dir, 'old.qcow2', '64M');
      qemuImg(dir, 'create', '-q', '-f', 'raw', 'new.raw', '64M');
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-b', 'old.qcow2', '-F', 'qcow2', 'top.qcow2');
      qemuIo(dir, '-f', 'qcow2', '-c', 'write -q -P 0x33 0 64k', 'top.qcow2');
      makeRaw(dir, 'base.raw', '64M');
      qemuImg(dir, 'convert', '-f', 'raw', '-O', 'qcow2', 'base.raw', 'base.qcow2');
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2');
      qemuIo(dir, '-f', 'qcow2', '-c', 'write -q -P 0x44 4M 64k', 'overlay.qcow2');
      run('cp', ['top.qcow2', 'top-before.qcow2'], { cwd: dir });
    },
    check: (_, dir) => {
      // The rebased image reads as it did over old.qcow2; the committed data is in base.qcow2.
      expect(qemuImg(dir, 'compare', 'top.qcow2', 'top-before.qcow2')).toMatch(/Images are identical/);
      expect(JSON.parse(qemuImg(dir, 'info', '--output=json', 'top.qcow2'))['backing-filename']).toBe(
        'new.raw',
      );
      expect(qemuIo(dir, '-f', 'qcow2', '-c', 'read -q -P 0x44 4M 64k', 'base.qcow2')).toBe('');
      expect(qemuImg(dir, 'map', '--output=json', 'overlay.qcow2')).not.toMatch(
        /"depth": 0, "present": true/,
      );
      for (const image of ['top.qcow2', 'base.qcow2', 'overlay.qcow2']) {
        expect(qemuImg(dir, 'check', image)).toMatch(/No errors/);
      }
    },
  },
  'packages/qcow2-core/README.md § Creating and writing images': {
    tools: ['qemu-img'],
    check: (_, dir) => expect(qemuImg(dir, 'check', `${dir}/tmp/disk.qcow2`)).toMatch(/No errors/),
  },
  'packages/qcow2-core/README.md § Persistent dirty bitmaps': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeQcow2(dir),
    check: ({ stdout }, dir) => {
      expect(stdout).toMatch(/offset: 1048576, length: 65536/);
      expect(qemuImg(dir, 'info', 'disk.qcow2')).toMatch(/name: nightly/);
      expect(qemuImg(dir, 'check', 'disk.qcow2')).toMatch(/No errors/);
    },
  },
  'packages/qcow2-core/README.md § Images with an external data file': {
    tools: ['qemu-img'],
    check: (_, dir) => expect(qemuImg(dir, 'check', `${dir}/tmp/disk.qcow2`)).toMatch(/No errors/),
  },
  'packages/qcow2-core/src/check/README.md § qcow2 check and repair': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeQcow2(dir),
    check: ({ stdout }) => expect(stdout).toMatch(/No errors were found on the image/),
  },
  'packages/qcow2-nbd/README.md § The library': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeRaw(dir),
  },
  'packages/qcow2-nbd/README.md § The library (2)': {
    after: [
      "/** @type {import('@qcowkit/blockdev').BlockDevice} */",
      'const device = new PatternDevice();',
      "console.log((await device.read(254, 3)).join(','));",
      'await device.write(0, new Uint8Array(1)).catch((error) => console.log(error.code));',
    ].join('\n'),
    check: ({ stdout }) => expect(stdout).toBe('254,255,0\nEROFS\n'),
  },
  // Continues 'The library (3)' and '(4)': the three run as one.
  'packages/qcow2-nbd/README.md § Connections on threads of their own': {
    setup: (dir) => writeFileSync(join(dir, 'shm/disk.raw'), new Uint8Array(4 << 20)),
  },
  'packages/qcow2-writer/README.md § Empty images (`qemu-img create -f qcow2`)': {
    tools: ['qemu-img'],
    check: ({ stdout }, dir) => {
      writeFileSync(join(dir, 'stdout.qcow2'), Buffer.from(stdout, 'latin1'));
      for (const image of ['disk.qcow2', 'overlay.qcow2', 'stdout.qcow2']) {
        expect(qemuImg(dir, 'check', image)).toMatch(/No errors/);
      }
    },
  },
  'packages/qcow2-writer/README.md § Conversions (`qemu-img convert -O qcow2`)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => {
      makeRaw(dir);
      qemuImg(dir, 'convert', '-f', 'raw', '-O', 'qcow2', 'disk.raw', 'base.qcow2');
    },
    replace: async () => ({ 'http://127.0.0.1:8080': await upload.url() }),
    check: (_, dir) => {
      const { received, contentLength } = upload.last();
      expect(received?.length).toBe(Number(contentLength));
      writeFileSync(join(dir, 'uploaded.qcow2'), received!);
      for (const image of [
        'disk.qcow2',
        'small.qcow2',
        'zstd.qcow2',
        'meta.qcow2',
        'delta.qcow2',
        'uploaded.qcow2',
      ]) {
        expect(qemuImg(dir, 'check', image)).toMatch(/No errors/);
        expect(qemuImg(dir, 'compare', '-f', 'raw', 'disk.raw', image)).toMatch(/Images are identical/);
      }
    },
  },
  'packages/qcow2-writer/README.md § Conversions (`qemu-img convert -O qcow2`) (2)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeRaw(dir),
    check: (_, dir) =>
      expect(qemuImg(dir, 'compare', '-f', 'raw', 'disk.raw', 'scratch.qcow2')).toMatch(/identical/),
  },
  'packages/qcow2-writer/README.md § Sparse output (`sparseSize`, `qemu-img convert -S`)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeRaw(dir),
    check: (_, dir) => {
      for (const image of ['full.qcow2', 'fewer.qcow2'])
        expect(qemuImg(dir, 'compare', '-f', 'raw', 'disk.raw', image)).toMatch(/identical/);
      // -S 0: the whole 16 MiB guest is one data extent.
      expect(qemuImg(dir, 'map', '--output=json', 'full.qcow2')).toMatch(
        /"length": 16777216, .*"data": true/,
      );
    },
  },
  'packages/qcow2-writer/README.md § Writing into an existing image (`copyInto`, `qemu-img convert -n`)': {
    tools: ['qemu-img', 'qemu-io'],
    setup: (dir) => makeRaw(dir),
    check: (_, dir) =>
      expect(qemuImg(dir, 'compare', '-f', 'raw', 'disk.raw', 'copy.qcow2')).toMatch(/identical/),
  },
  'packages/qcow2-writer/README.md § `measure` (`qemu-img measure -O qcow2`)': {
    check: ({ stdout }) => expect(stdout).toBe('{ required: 393216, fullyAllocated: 1074135040 }\n'),
  },
};

const examples = readmeFiles(ROOT).flatMap((file) => extractExamples(ROOT, file));
const checked = examples.filter((example) => example.skip === undefined);
const idOf = new Map(examples.map((example, index) => [example, `ex${String(index).padStart(2, '0')}`]));
const fixtureOf = (example: ReadmeExample): Fixture => FIXTURES[example.key] ?? {};

test('every fixture names a block of a README', () => {
  const keys = new Set(checked.map((example) => example.key));
  expect(Object.keys(FIXTURES).filter((key) => !keys.has(key))).toEqual([]);
});

describe('README examples typecheck', () => {
  let problems: Map<string, string[]> | undefined;
  const problemsOf = (example: ReadmeExample) => {
    problems ??= typecheckExamples(
      ROOT,
      checked.map((block) => {
        const fixture = fixtureOf(block);
        return {
          id: idOf.get(block)!,
          example: block,
          assembled: assemble(block, fixture),
          ...(fixture.path === undefined ? {} : { path: fixture.path }),
          ...(fixture.files === undefined ? {} : { files: fixture.files }),
        };
      }),
    );
    return problems.get(idOf.get(example)!);
  };
  test.each(checked.map((example) => [example.key, example] as const))('%s', (_, example) => {
    expect(problemsOf(example)).toEqual([]);
  });
});

describe('README examples run', () => {
  let scratch = '';
  beforeAll(() => {
    scratch = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qk-readme-'));
    // The examples import @qcowkit/... as a project depending on the packages would.
    mkdirSync(join(scratch, 'node_modules'));
    symlinkSync(
      join(ROOT, 'tests-e2e', 'node_modules', '@qcowkit'),
      join(scratch, 'node_modules', '@qcowkit'),
    );
  });
  afterAll(() => {
    upload.close();
    if (scratch !== '') rmSync(scratch, { recursive: true, force: true });
  });

  // A block that a later block continues runs as part of that one.
  const continued = new Set(examples.map((example) => example.continues));
  const runnable = checked.filter(
    (example) => fixtureOf(example).typecheckOnly === undefined && !continued.has(example),
  );
  const slots = limit(2); // two cores

  test.concurrent.each(runnable.map((example) => [example.key, example] as const))(
    '%s',
    async (_, example) => {
      const fixture = fixtureOf(example);
      if (fixture.tools !== undefined && !requireTools(...fixture.tools)) return;
      await slots(async () => {
        const dir = join(scratch, idOf.get(example)!);
        mkdirSync(join(dir, 'tmp'), { recursive: true });
        mkdirSync(join(dir, 'shm'));
        await fixture.setup?.(dir);
        let code = assemble(example, fixture).code.replace(
          /(?<=['"`=])\/(tmp|dev\/shm)\//g,
          (_, where: string) => (where === 'tmp' ? `${dir}/tmp/` : `${dir}/shm/`),
        );
        for (const [from, to] of Object.entries((await fixture.replace?.()) ?? {}))
          code = code.replaceAll(from, to);
        writeFileSync(join(dir, 'example.mjs'), toRunnableModule(example, code));
        const result = await runExample(dir, fixture.whileRunning);
        if (result.code !== 0) {
          throw new Error(
            `${example.file}:${example.line}: exited with ${result.signal ?? result.code}\n${result.stderr}\n${result.stdout.slice(0, 2000)}`,
          );
        }
        await fixture.check?.(result, dir);
      });
    },
  );
});

/** Runs dir/example.mjs with Node; killed after 60 s. */
function runExample(dir: string, whileRunning: Fixture['whileRunning']): Promise<RunResult> {
  // Without the CA bundle Node would parse at start-up (about 50 ms a process): the examples use no TLS.
  const { NODE_EXTRA_CA_CERTS: _, ...env } = process.env;
  const child = spawn(process.execPath, ['example.mjs'], {
    cwd: dir,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  const waiters: { pattern: RegExp; resolve: () => void }[] = [];
  child.stdout.setEncoding('latin1').on('data', (text: string) => {
    stdout += text;
    for (const waiter of waiters.filter(({ pattern }) => pattern.test(stdout))) waiter.resolve();
  });
  child.stderr.setEncoding('utf8').on('data', (text: string) => {
    stderr += text;
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const exited = new Promise<RunResult>((resolveRun, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolveRun({ code, signal, stdout, stderr });
    });
  });
  if (whileRunning === undefined) return exited;
  const interaction = whileRunning({
    dir,
    child,
    waitForOutput: (pattern) =>
      pattern.test(stdout)
        ? Promise.resolve()
        : Promise.race([
            new Promise<void>((resolveWait) => waiters.push({ pattern, resolve: resolveWait })),
            exited.then((result) => {
              throw new Error(
                `exited (${result.signal ?? result.code}) before printing ${pattern}\n${result.stderr}`,
              );
            }),
          ]),
  }).catch((error: unknown) => {
    child.kill('SIGKILL');
    throw error;
  });
  return Promise.all([exited, interaction]).then(([result]) => result);
}

/** Runs at most `count` of the functions given at once. */
function limit(count: number): <T>(work: () => Promise<T>) => Promise<T> {
  let running = 0;
  const queue: (() => void)[] = [];
  return async (work) => {
    if (running < count) running++;
    else await new Promise<void>((takeTurn) => queue.push(takeTurn)); // handed a running slot
    try {
      return await work();
    } finally {
      const next = queue.shift();
      if (next === undefined) running--;
      else next();
    }
  };
}

describe('README command lines use flags the commands accept', () => {
  const files = readmeFiles(ROOT);
  const commands = files.flatMap((file) => extractCommands(ROOT, file));
  const helpCache = new Map<string, Promise<string>>();
  const help = (argv: string[]) => {
    const key = argv.join(' ');
    let text = helpCache.get(key);
    if (text === undefined) {
      text = (async () => {
        if (argv[0] === 'qcow2-nbd') {
          return run(process.execPath, [join(ROOT, 'packages/qcow2-nbd/dist/bin/qcow2-nbd.js'), '--help']);
        }
        let out = '';
        const output = {
          write: (chunk: string) => {
            out += chunk;
          },
        };
        const io: CliIo = {
          stdout: output,
          stderr: output,
          cwd: ROOT,
          env: {},
          isTTY: false,
        };
        const code = await runCli(argv.slice(1), io);
        if (code !== 0) throw new Error(`${argv.join(' ')}: exit ${code}\n${out}`);
        return out;
      })();
      helpCache.set(key, text);
    }
    return text;
  };
  /** The flags `command` takes, from its --help (qcow2's global ones included). */
  const accepted = async (command: ReadmeCommand['command'], subcommand: string | undefined) => {
    const global = flagsInHelp(await help(command === 'qcow2' ? ['qcow2', '--help'] : ['qcow2-nbd']));
    if (subcommand === undefined || subcommand === 'help') return global;
    return new Set([...global, ...flagsInHelp(await help(['qcow2', 'help', subcommand]))]);
  };

  test('the READMEs have command lines to check', () => {
    expect(commands.filter((command) => command.command === 'qcow2').length).toBeGreaterThan(20);
    expect(commands.filter((command) => command.command === 'qcow2-nbd').length).toBeGreaterThan(10);
  });

  test.each(files)('%s', async (file) => {
    const subcommands = (await help(['qcow2', '--help'])).split(/^Commands:$/m)[1] ?? '';
    const wrong: string[] = [];
    for (const command of commands.filter((entry) => entry.file === file)) {
      const where = `${command.file}:${command.line}: ${command.text}`;
      if (
        command.subcommand !== undefined &&
        !new RegExp(`^  ${command.subcommand} `, 'm').test(subcommands)
      ) {
        wrong.push(`${where}: no subcommand '${command.subcommand}'`);
        continue;
      }
      const flags = await accepted(command.command, command.subcommand);
      for (const flag of command.flags) if (!flags.has(flag)) wrong.push(`${where}: ${flag}`);
    }
    if (file === 'packages/qcow2-nbd/README.md') {
      const flags = await accepted('qcow2-nbd', undefined);
      for (const row of extractFlagTable(ROOT, file)) {
        for (const flag of row.flags) if (!flags.has(flag)) wrong.push(`${file}:${row.line}: ${flag}`);
      }
    }
    expect(wrong).toEqual([]);
  });
});
