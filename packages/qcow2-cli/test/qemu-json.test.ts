import { describe, expect, test } from 'vitest';
import { qdictKeyOrder, qemuJsonString, toQemuJson } from '../src/output/qemu-json.js';

describe('QEMU JSON layout', () => {
  test('keys come out in the order qemu-img 7.2 prints them', () => {
    // Orders copied from qemu-img info / check --output=json on this machine.
    expect(
      qdictKeyOrder([
        'virtual-size',
        'filename',
        'format',
        'actual-size',
        'cluster-size',
        'dirty-flag',
        'backing-filename',
        'full-backing-filename',
        'backing-filename-format',
        'snapshots',
        'format-specific',
      ]),
    ).toEqual([
      'backing-filename-format',
      'snapshots',
      'virtual-size',
      'filename',
      'cluster-size',
      'format',
      'actual-size',
      'format-specific',
      'full-backing-filename',
      'backing-filename',
      'dirty-flag',
    ]);
    expect(
      qdictKeyOrder([
        'id',
        'name',
        'vm-state-size',
        'date-sec',
        'date-nsec',
        'vm-clock-sec',
        'vm-clock-nsec',
        'icount',
      ]),
    ).toEqual([
      'icount',
      'vm-clock-nsec',
      'name',
      'date-sec',
      'date-nsec',
      'vm-clock-sec',
      'id',
      'vm-state-size',
    ]);
    expect(
      qdictKeyOrder([
        'compat',
        'data-file',
        'data-file-raw',
        'extended-l2',
        'lazy-refcounts',
        'corrupt',
        'refcount-bits',
        'bitmaps',
        'compression-type',
      ]),
    ).toEqual([
      'compat',
      'compression-type',
      'lazy-refcounts',
      'bitmaps',
      'refcount-bits',
      'data-file',
      'data-file-raw',
      'corrupt',
      'extended-l2',
    ]);
  });

  test('strings escape like QEMU: quotes, control characters, non-ASCII as upper-case \\u', () => {
    expect(qemuJsonString('a/b')).toBe('"a/b"');
    expect(qemuJsonString('wé"ird')).toBe('"w\\u00E9\\"ird"');
    expect(qemuJsonString('tab\there\n')).toBe('"tab\\there\\n"');
    expect(qemuJsonString('\u0001')).toBe('"\\u0001"');
    expect(qemuJsonString('😀')).toBe('"\\uD83D\\uDE00"');
  });

  test('pretty printing indents by four and leaves out undefined members', () => {
    const text = toQemuJson({
      'virtual-size': 1048576,
      filename: 'base.raw',
      format: 'raw',
      'actual-size': 4096,
      'dirty-flag': false,
      'cluster-size': undefined,
    });
    expect(text).toBe(
      '{\n    "virtual-size": 1048576,\n    "filename": "base.raw",\n    "format": "raw",\n    "actual-size": 4096,\n    "dirty-flag": false\n}',
    );
    expect(toQemuJson([{ a: [1] }])).toBe('[\n    {\n        "a": [\n            1\n        ]\n    }\n]');
  });
});
