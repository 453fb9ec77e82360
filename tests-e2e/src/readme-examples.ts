/**
 * The code examples of the READMEs, as a library user would copy them: every fenced ```ts and
 * ```js block of README.md, packages/*\/README.md and packages/qcow2-core/src/check/README.md is
 * extracted, typechecked against the built packages (imported by name, `@qcowkit/...`, through
 * their `exports`, never their sources), and turned into a module Node can run.
 *
 * Markers in a README (an HTML comment on the line before the fence, so it does not render):
 *
 * - `<!-- example: continues -->`: the block goes on from the previous ts/js block of the same
 *   file (it uses that block's imports and variables). It is checked and run after that block, in
 *   a `{ ... }` scope of its own, so it may declare its names again.
 * - `<!-- example: skip REASON -->`: the block is neither checked nor run. For text that is not
 *   code one could run (pseudo-code, an excerpt); keep these rare and say why.
 *
 * What a block needs to run (files, tools, a client talking to its server) and which blocks are
 * only typechecked is in tests-e2e/test/readme-examples.test.ts.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import ts from 'typescript';

/**
 * The READMEs whose examples are checked, relative to the repository root: the root one, each
 * package's, and the check engine's (packages/qcow2-core/src/check/README.md).
 */
export function readmeFiles(root: string): string[] {
  const packages = readdirSync(join(root, 'packages'), { withFileTypes: true })
    .filter((entry) => entry.isDirectory() && existsSync(join(root, 'packages', entry.name, 'README.md')))
    .map((entry) => `packages/${entry.name}/README.md`)
    .sort();
  return ['README.md', ...packages, 'packages/qcow2-core/src/check/README.md'];
}

export interface ReadmeExample {
  /** `FILE § HEADING`, with ` (2)`, ` (3)`... for the later blocks of a section. */
  key: string;
  /** The README, relative to the repository root. */
  file: string;
  /** 1-based line of the block's first line of code. */
  line: number;
  lang: 'ts' | 'js';
  code: string;
  /** The block this one continues (`<!-- example: continues -->`). */
  continues: ReadmeExample | undefined;
  /** Why the block is not checked (`<!-- example: skip REASON -->`). */
  skip: string | undefined;
}

const MARKER = /^<!--\s*example:\s*(continues|skip)\b\s*(.*?)\s*-->$/;

/** Every ts/js block of the README at `root/file`, in order. */
export function extractExamples(root: string, file: string): ReadmeExample[] {
  const lines = readFileSync(join(root, file), 'utf8').split('\n');
  const examples: ReadmeExample[] = [];
  const perHeading = new Map<string, number>();
  let heading = '(top)';
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] ?? '';
    const fence = /^(\s*)(`{3,}|~{3,})\s*([\w-]*)/.exec(line);
    if (fence === null) {
      const title = /^#{1,6}\s+(.*?)\s*#*$/.exec(line);
      if (title?.[1] !== undefined) heading = title[1];
      continue;
    }
    const [, indent = '', ticks = '', info = ''] = fence;
    const close = new RegExp(`^\\s*${ticks[0] === '`' ? '`' : '~'}{${ticks.length},}\\s*$`);
    let end = i + 1;
    while (end < lines.length && !close.test(lines[end] ?? '')) end++;
    if (end === lines.length) throw new Error(`${file}:${i + 1}: a code fence that never closes`);
    const lang =
      info === 'ts' || info === 'typescript'
        ? 'ts'
        : info === 'js' || info === 'javascript'
          ? 'js'
          : undefined;
    if (lang !== undefined) {
      let previous = i - 1;
      while (previous >= 0 && (lines[previous] ?? '').trim() === '') previous--;
      const marker = MARKER.exec((lines[previous] ?? '').trim());
      const count = (perHeading.get(heading) ?? 0) + 1;
      perHeading.set(heading, count);
      const code = lines
        .slice(i + 1, end)
        .map((text) => (text.startsWith(indent) ? text.slice(indent.length) : text))
        .join('\n');
      let continues: ReadmeExample | undefined;
      if (marker?.[1] === 'continues') {
        continues = examples.findLast((example) => example.skip === undefined);
        if (continues === undefined) throw new Error(`${file}:${i + 1}: 'continues' with no block before it`);
        if (continues.lang !== lang) throw new Error(`${file}:${i + 1}: continues a ${continues.lang} block`);
      }
      if (marker?.[1] === 'skip' && marker[2] === '') {
        throw new Error(`${file}:${i + 1}: <!-- example: skip --> needs a reason`);
      }
      examples.push({
        key: `${file} § ${heading}${count > 1 ? ` (${count})` : ''}`,
        file,
        line: i + 2,
        lang,
        code,
        continues,
        skip: marker?.[1] === 'skip' ? marker[2] : undefined,
      });
    }
    i = end;
  }
  return examples;
}

/** What to compile or run for one example: its code after the blocks it continues. */
export interface AssembledExample {
  code: string;
  /** `file:line` in the README for a 1-based line of `code` (undefined for lines the harness added). */
  origin(line: number): string | undefined;
}

/** The example's code, after the blocks it continues, with `before` and `after` around it. */
export function assemble(
  example: ReadmeExample,
  extra: { before?: string; after?: string } = {},
): AssembledExample {
  const lines: string[] = [];
  const origins: (string | undefined)[] = [];
  const add = (text: string, origin: ((index: number) => string) | undefined) => {
    text.split('\n').forEach((line, index) => {
      lines.push(line);
      origins.push(origin?.(index));
    });
  };
  const chain: ReadmeExample[] = [];
  for (let at: ReadmeExample | undefined = example; at !== undefined; at = at.continues) chain.unshift(at);
  if (extra.before !== undefined) add(extra.before, undefined);
  chain.forEach((block, index) => {
    if (index > 0) add('{', undefined);
    add(block.code, (line) => `${block.file}:${block.line + line}`);
    if (index > 0) add('}', undefined);
  });
  if (extra.after !== undefined) add(extra.after, undefined);
  return { code: lines.join('\n'), origin: (line) => origins[line - 1] };
}

/** A typecheck input: one module, and files next to it that it may import. */
export interface TypecheckInput {
  id: string;
  example: ReadmeExample;
  assembled: AssembledExample;
  /** Where the block sits in its folder (default `example.ts` / `example.js`). */
  path?: string;
  /** More files of the example's folder (relative path -> text), e.g. a module it imports. */
  files?: Record<string, string>;
}

/**
 * noImplicitAny findings, not reported for JavaScript blocks: a plain JavaScript user annotates
 * nothing, and what matters there is that names, arguments and options match the packages' types.
 */
const IMPLICIT_ANY = new Set([7005, 7006, 7008, 7019, 7022, 7023, 7024, 7031, 7034]);

/**
 * Typechecks every input in one program, each as a module in a folder of its own under
 * `tests-e2e/.readme-examples/` (virtual: nothing is written), so `@qcowkit/...` resolves through
 * tests-e2e's dependencies to the built packages, as it would in a project depending on them.
 * Compiler options are tsconfig.test.json's (strict), with JavaScript checked too. Returns the
 * problems found per input id, each `README:line: message` (empty when it checks clean).
 */
export function typecheckExamples(root: string, inputs: readonly TypecheckInput[]): Map<string, string[]> {
  const configPath = join(root, 'tsconfig.test.json');
  const config = ts.readConfigFile(configPath, (path) => ts.sys.readFile(path));
  if (config.error !== undefined)
    throw new Error(ts.flattenDiagnosticMessageText(config.error.messageText, '\n'));
  const parsed = ts.parseJsonConfigFileContent(config.config, ts.sys, root, undefined, configPath);
  const options: ts.CompilerOptions = {
    ...parsed.options,
    noEmit: true,
    allowJs: true,
    checkJs: true,
    moduleDetection: ts.ModuleDetectionKind.Force,
    composite: false,
    incremental: false,
    tsBuildInfoFile: undefined,
  };
  const virtual = new Map<string, string>();
  const main = new Map<string, { input: TypecheckInput; path: string }>();
  for (const input of inputs) {
    const folder = join(root, 'tests-e2e', '.readme-examples', input.id);
    const path = join(folder, input.path ?? `example.${input.example.lang}`);
    virtual.set(path, input.assembled.code);
    for (const [name, text] of Object.entries(input.files ?? {})) virtual.set(join(folder, name), text);
    main.set(path, { input, path });
  }
  const host = ts.createCompilerHost(options);
  const { fileExists, readFile, getSourceFile, directoryExists } = host;
  const folders = new Set([...virtual.keys()].flatMap((path) => ancestors(path)));
  host.fileExists = (path) => virtual.has(path) || fileExists.call(host, path);
  host.directoryExists = (path) => folders.has(path) || (directoryExists?.call(host, path) ?? false);
  host.readFile = (path) => virtual.get(path) ?? readFile.call(host, path);
  host.getSourceFile = (path, languageVersion, ...rest) => {
    const text = virtual.get(path);
    return text === undefined
      ? getSourceFile.call(host, path, languageVersion, ...rest)
      : ts.createSourceFile(path, text, languageVersion, true);
  };
  const program = ts.createProgram([...main.keys()], options, host);
  const found = new Map<string, string[]>();
  for (const { input, path } of main.values()) {
    const problems: string[] = [];
    const folder = join(root, 'tests-e2e', '.readme-examples', input.id);
    const sourceFiles = [path, ...Object.keys(input.files ?? {}).map((name) => join(folder, name))];
    for (const file of sourceFiles) {
      const source = program.getSourceFile(file);
      if (source === undefined) throw new Error(`${file}: not in the program`);
      const diagnostics = [
        ...program.getSyntacticDiagnostics(source),
        ...program.getSemanticDiagnostics(source),
      ];
      for (const diagnostic of diagnostics) {
        if (input.example.lang === 'js' && IMPLICIT_ANY.has(diagnostic.code)) continue;
        const { line } = source.getLineAndCharacterOfPosition(diagnostic.start ?? 0);
        const added = () =>
          `${input.example.key}, in the test's code: ${source.text.split('\n')[line]?.trim()}`;
        const where =
          file === path
            ? (input.assembled.origin(line + 1) ?? added())
            : `${input.example.key}, ${relative(folder, file)}`;
        problems.push(`${where}: ${ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n  ')}`);
      }
    }
    found.set(input.id, problems);
  }
  for (const diagnostic of program.getGlobalDiagnostics()) {
    throw new Error(`typecheck: ${ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n')}`);
  }
  return found;
}

function ancestors(path: string): string[] {
  const found: string[] = [];
  for (let at = dirname(path); at !== dirname(at); at = dirname(at)) found.push(at);
  return found;
}

/** The example as an ES module Node runs: TypeScript types stripped (and `using` lowered). */
export function toRunnableModule(example: ReadmeExample, code: string): string {
  if (example.lang === 'js') return code;
  return ts.transpileModule(code, {
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      verbatimModuleSyntax: true,
    },
    fileName: 'example.mts',
  }).outputText;
}

/** A `qcow2 ...` or `qcow2-nbd ...` command line (or usage synopsis) written in a README. */
export interface ReadmeCommand {
  file: string;
  line: number;
  command: 'qcow2' | 'qcow2-nbd';
  /** qcow2's subcommand (undefined for qcow2-nbd, or for `qcow2 --help`). */
  subcommand: string | undefined;
  /** Every flag it uses (`--output=json` as `--output`). */
  flags: string[];
  text: string;
}

const SHELL_LANGS = new Set(['sh', 'bash', 'shell', 'console']);
const COMMANDS = new Map<string, ReadmeCommand['command']>([
  ['qcow2', 'qcow2'],
  ['qcow2-nbd', 'qcow2-nbd'],
  ['packages/qcow2-cli/dist/bin/qcow2.js', 'qcow2'],
  ['packages/qcow2-nbd/dist/bin/qcow2-nbd.js', 'qcow2-nbd'],
]);
/** Words that may come before a command without being it (`pnpm qcow2 ...`, `sudo ...`). */
const LAUNCHERS = new Set(['pnpm', 'npx', 'node', 'sudo', 'time', 'exec', 'env']);

/** Splits a shell line into words (quotes removed) and operators (`|`, `&&`, `;`, `&`, `[`, `]`, `>`). */
function shellWords(text: string): { word: string; operator: boolean }[] {
  const words: { word: string; operator: boolean }[] = [];
  const pattern =
    /\s*(?:(#.*$)|(\|\||&&|[|;&<>[\]]|\d?>>?&?\d*)(?=\s|$)|((?:'[^']*'|"(?:\\.|[^"])*"|\\.|[^\s'"])+))/gy;
  for (let match = pattern.exec(text); match !== null && match[0] !== ''; match = pattern.exec(text)) {
    if (match[1] !== undefined) break;
    if (match[2] !== undefined) words.push({ word: match[2], operator: true });
    else if (match[3] !== undefined) {
      words.push({ word: match[3].replace(/'([^']*)'|"((?:\\.|[^"])*)"|\\(.)/g, '$1$2$3'), operator: false });
    }
  }
  return words;
}

function isFlag(word: string): boolean {
  return /^--?[A-Za-z]/.test(word);
}

/** The commands of one shell line. */
function commandsOfShellLine(file: string, line: number, text: string): ReadmeCommand[] {
  const found: ReadmeCommand[] = [];
  let current: ReadmeCommand | undefined;
  let atStart = true;
  for (const { word, operator } of shellWords(text)) {
    if (operator) {
      current = undefined;
      atStart = true;
      continue;
    }
    const command = COMMANDS.get(word);
    if (atStart && command !== undefined) {
      current = { file, line, command, subcommand: undefined, flags: [], text: text.trim() };
      found.push(current);
      atStart = false;
      continue;
    }
    if (atStart && (LAUNCHERS.has(word) || /^\w+=/.test(word))) continue;
    atStart = false;
    if (current === undefined) continue;
    if (isFlag(word)) current.flags.push(word.replace(/=.*/, ''));
    else if (current.command === 'qcow2' && current.subcommand === undefined) current.subcommand = word;
  }
  return found;
}

/**
 * Every `qcow2` / `qcow2-nbd` command line of the README's shell blocks (in a block with `$ `
 * prompts, only the prompted lines), and every usage synopsis in an inline code span of its text
 * (`` `qcow2 info [-f FMT] FILE` ``), with the flags they use.
 */
export function extractCommands(root: string, file: string): ReadmeCommand[] {
  const lines = readFileSync(join(root, file), 'utf8').split('\n');
  const found: ReadmeCommand[] = [];
  const prose: { line: number; text: string }[] = [];
  for (let i = 0; i < lines.length; i++) {
    const fence = /^\s*(`{3,}|~{3,})\s*([\w-]*)/.exec(lines[i] ?? '');
    if (fence === null) {
      prose.push({ line: i + 1, text: lines[i] ?? '' });
      continue;
    }
    let end = i + 1;
    while (end < lines.length && !/^\s*(`{3,}|~{3,})\s*$/.test(lines[end] ?? '')) end++;
    if (SHELL_LANGS.has(fence[2] ?? '')) {
      const block = lines.slice(i + 1, end);
      const prompted = block.some((text) => text.startsWith('$ '));
      let pending = '';
      block.forEach((text, index) => {
        if (prompted && pending === '' && !text.startsWith('$ ')) return;
        const command = pending + (prompted && pending === '' ? text.slice(2) : text);
        if (command.endsWith('\\')) {
          pending = `${command.slice(0, -1)} `;
          return;
        }
        pending = '';
        found.push(...commandsOfShellLine(file, i + 2 + index, command));
      });
    }
    i = end;
  }
  // Inline code spans may wrap across lines of a paragraph.
  const text = prose.map((entry) => entry.text).join('\n');
  const lineAt = (offset: number) => prose[text.slice(0, offset).split('\n').length - 1]?.line ?? 0;
  for (const match of text.matchAll(/`([^`]+)`/g)) {
    const span = match[1]!.replace(/\s*\n\s*/g, ' ');
    const synopsis = /^(qcow2|qcow2-nbd) (.*)$/.exec(span);
    if (synopsis === null) continue;
    const words = synopsis[2]!.split(/(?<!\\)\|(?!\s*-)/)[0]!; // up to a pipe into another command
    const flags = [...words.matchAll(/(?<![\w-])--?[A-Za-z][\w-]*/g)].map((flag) => flag[0]);
    const first = words.trim().split(/\s+/)[0];
    found.push({
      file,
      line: lineAt(match.index ?? 0),
      command: synopsis[1] as ReadmeCommand['command'],
      subcommand: synopsis[1] === 'qcow2' && first !== undefined && !isFlag(first) ? first : undefined,
      flags,
      text: span,
    });
  }
  return found;
}

/** The flags a `--help` text lists in its Options section (`-f, --format <FORMAT>` gives both). */
export function flagsInHelp(help: string): Set<string> {
  const flags = new Set<string>();
  const options = help.split(/^Options:$/m)[1]?.split(/^\S/m)[0] ?? '';
  for (const line of options.split('\n')) {
    const names = /^\s{2}((?:--?[\w-]+(?:, )?)+)/.exec(line)?.[1] ?? '';
    for (const name of names.split(', ')) if (name !== '') flags.add(name);
  }
  return flags;
}

/** Rows of a flag table (`| \`-p, --port PORT\` | ... |`): the flags of each row's first cell. */
export function extractFlagTable(root: string, file: string): { line: number; flags: string[] }[] {
  const rows: { line: number; flags: string[] }[] = [];
  readFileSync(join(root, file), 'utf8')
    .split('\n')
    .forEach((text, index) => {
      const cell = /^\|\s*`(-[^`]*)`\s*\|/.exec(text)?.[1];
      if (cell !== undefined) {
        rows.push({
          line: index + 1,
          flags: [...cell.matchAll(/(?<![\w-])--?[A-Za-z][\w-]*/g)].map((m) => m[0]),
        });
      }
    });
  return rows;
}
