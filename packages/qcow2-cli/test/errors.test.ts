import { BlockDeviceError, isBlockDeviceError } from '@qcowkit/blockdev';
import { describe, expect, test } from 'vitest';
import {
  CliError,
  debugTrace,
  describeError,
  describeImageError,
  openError,
  UsageError,
} from '../src/errors.js';

describe('CLI errors', () => {
  test('are BlockDeviceErrors with stable codes', () => {
    expect(isBlockDeviceError(new UsageError('bad flag'), 'EINVAL')).toBe(true);
    const wrapped = new CliError('could not', { cause: new BlockDeviceError('ECORRUPT', 'broken') });
    expect(wrapped.code).toBe('ECORRUPT');
    expect(wrapped.exitCode).toBe(1);
    expect(new CliError('x').code).toBe('EIO');
    expect(new CliError('x', { code: 'ENOENT', exitCode: 63 })).toMatchObject({
      code: 'ENOENT',
      exitCode: 63,
    });
  });

  test('describe themselves in one line', () => {
    expect(describeError(new Error('first\n  second'))).toBe('first; second');
    expect(describeError(Object.assign(new Error('raw'), { code: 'EACCES' }))).toBe('Permission denied');
    expect(describeError('text')).toBe('text');
    // Bytes from a damaged image stay printable and on one line.
    expect(describeError(new BlockDeviceError('ECORRUPT', "unknown format 'qcow\f' for 'a\u0000b'"))).toBe(
      "unknown format 'qcow\\x0c' for 'a\\x00b'",
    );
    expect(
      describeImageError(
        new BlockDeviceError('ECORRUPT', 'qcow2: file:/abs/x.qcow2: 2 corruptions'),
        'x.qcow2',
      ),
    ).toBe('x.qcow2: 2 corruptions');
  });

  test('open errors use the short system wording only for the file itself', () => {
    const own = new BlockDeviceError('ENOENT', 'open: /x/top.qcow2: no such file or directory (ENOENT)');
    expect(openError('top.qcow2', own, '/x/top.qcow2').message).toBe(
      "Could not open 'top.qcow2': No such file or directory",
    );
    const backing = new BlockDeviceError('ENOENT', 'open: /x/base.raw: no such file or directory (ENOENT)');
    expect(openError('top.qcow2', backing, '/x/top.qcow2').message).toBe(
      "Could not open 'top.qcow2': open: /x/base.raw: no such file or directory (ENOENT)",
    );
  });

  test('the debug trace follows the cause chain', () => {
    const trace = debugTrace(new CliError('outer', { cause: new Error('inner') }));
    expect(trace).toMatch(/CliError: outer[\s\S]*Caused by: Error: inner/);
  });
});
