import { describe, expect, test } from 'vitest';
import type { CliIo } from '../src/io.js';
import { ProgressReporter, progressReporter } from '../src/output/progress.js';

function sink(): { text: () => string; write: (chunk: string) => void } {
  let out = '';
  return {
    text: () => out,
    write: (chunk) => {
      out += chunk;
    },
  };
}

function io(isTTY: boolean, env: Record<string, string> = {}): CliIo & { err: () => string } {
  const err = sink();
  return { stdout: sink(), stderr: err, cwd: '/', env, isTTY, err: err.text };
}

describe('progress', () => {
  test('off a terminal: qemu-img lines, one per whole percent moved, 0 and 100 always', () => {
    const out = sink();
    const progress = new ProgressReporter(out);
    for (let done = 0; done <= 1000; done += 3) progress.update(done, 1000);
    progress.finish();
    const figures = [...out.text().matchAll(/ {4}\((\d+\.\d\d)\/100%\)\r/g)].map((m) => Number(m[1]));
    expect(out.text().startsWith('    (0.00/100%)\r')).toBe(true);
    expect(out.text().endsWith('    (100.00/100%)\r\n')).toBe(true);
    expect(figures.length).toBeGreaterThan(50);
    expect(figures.length).toBeLessThanOrEqual(102);
    for (let i = 1; i < figures.length - 1; i++)
      expect(figures[i]! - figures[i - 1]!).toBeGreaterThanOrEqual(1);
  });

  test('on a terminal: a bar as wide as COLUMNS allows, redrawn in place', () => {
    const terminal = io(true, { COLUMNS: '60' });
    const progress = progressReporter(terminal, true)!;
    progress.update(1, 4);
    progress.finish();
    const lines = terminal.err().split('\r').filter(Boolean);
    // The bar starts in the same column whatever the figure's width.
    expect(lines[0]).toBe(`    (25.00/100%)  [${'#'.repeat(10)}${'.'.repeat(30)}]`);
    expect(lines.at(-1)).toBe(`    (100.00/100%) [${'#'.repeat(40)}]\n`);
    expect(terminal.err().endsWith('\n')).toBe(true);
    for (const line of lines) expect(line.replace('\n', '').length).toBeLessThanOrEqual(60);
  });

  test('not asked: nothing, terminal or not', () => {
    expect(progressReporter(io(true), false)).toBeUndefined();
    expect(progressReporter(io(false), false)).toBeUndefined();
    const plain = io(false);
    progressReporter(plain, true)!.finish();
    expect(plain.err()).toBe('    (100.00/100%)\r\n');
  });
});
