/**
 * `createNeedsImageEngine`: the command lines create's own bundle (bin/qcow2-create.ts) runs are
 * exactly those that neither open a backing file nor create through `Qcow2Image`; the rest go to
 * the whole CLI, which has the image engine.
 */
import { describe, expect, test } from 'vitest';
import { createNeedsImageEngine } from '../src/commands/create.js';
import { createFastPath } from '../src/commands/fast-paths.js';

const needs = (...args: string[]) => {
  const line = createFastPath(args);
  if (line === undefined) throw new Error(`not a fast-path line: ${args.join(' ')}`);
  return createNeedsImageEngine(line.file, line.options);
};

describe('createNeedsImageEngine', () => {
  test('plain images, raw or qcow2, with any preallocation but metadata: no engine', () => {
    expect(needs('-f', 'qcow2', 'a', '1P')).toBe(false);
    expect(needs('-q', '-f', 'qcow2', '-o', 'cluster_size=4k,extended_l2=on', 'a', '1G')).toBe(false);
    expect(needs('-f', 'qcow2', '-o', 'preallocation=falloc', 'a', '1M')).toBe(false);
    expect(needs('-f', 'qcow2', '-o', 'preallocation=full', 'a', '1M')).toBe(false);
    expect(needs('a', '1M')).toBe(false);
    expect(needs('-f', 'raw', '-o', 'preallocation=full', 'a', '1M')).toBe(false);
    // raw refuses metadata itself, without the engine.
    expect(needs('-f', 'raw', '-o', 'preallocation=metadata', 'a', '1M')).toBe(false);
    // A backing file that is not opened (-u) needs no engine either.
    expect(needs('-u', '-f', 'qcow2', '-b', 'base', '-F', 'qcow2', 'a', '1M')).toBe(false);
  });

  test('a backing file to open, metadata preallocation or an external data file: the engine', () => {
    expect(needs('-f', 'qcow2', '-b', 'base', '-F', 'qcow2', 'a')).toBe(true);
    expect(needs('-f', 'qcow2', '-o', 'backing_file=base,backing_fmt=raw', 'a')).toBe(true);
    expect(needs('-f', 'raw', '-b', 'base', '-F', 'raw', 'a')).toBe(true);
    expect(needs('-f', 'qcow2', '-o', 'preallocation=metadata', 'a', '1M')).toBe(true);
    expect(needs('-f', 'qcow2', '-o', 'preallocation=off', '-o', 'preallocation=metadata', 'a', '1M')).toBe(
      true,
    );
    expect(needs('-f', 'qcow2', '-o', 'data_file=a.data', 'a', '1M')).toBe(true);
  });

  test('an unknown -o key throws as createCommand does', () => {
    expect(() => needs('-f', 'qcow2', '-o', 'bogus=1', 'a', '1M')).toThrow("a: Invalid parameter 'bogus'");
  });
});
