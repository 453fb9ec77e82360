import { describe, expect, it } from 'vitest';
import { CliError } from '../src/cli/errors.js';
import { parseArgs, parseSnapshotSpec } from '../src/cli/options.js';

function options(argv: string[]) {
  const parsed = parseArgs(argv, '1.2.3');
  if (parsed.kind !== 'run') throw new Error('expected options');
  return parsed.options;
}

describe('qcow2-nbd flags', () => {
  it('defaults as qemu-nbd', () => {
    const o = options(['disk.raw']);
    expect(o).toMatchObject({
      port: 10809,
      bind: '127.0.0.1',
      shared: 1,
      persistent: false,
      discard: 'ignore',
      aio: undefined,
      connectionThreads: 16,
    });
    expect(o.exports).toEqual([{ name: '', path: 'disk.raw' }]);
  });

  it('parses short and long flags', () => {
    const o = options([
      '-p',
      '1234',
      '-b',
      '0.0.0.0',
      '-k',
      '/tmp/s',
      '-x',
      'n',
      '-D',
      'd',
      '-r',
      '-f',
      'qcow2',
      '-t',
      '-e',
      '4',
      '-s',
      '--discard=unmap',
      '--aio=sync',
      '-A',
      '--pid-file',
      'p',
      '--tls-creds',
      'c',
      'img',
    ]);
    expect(o).toMatchObject({
      port: 1234,
      bind: '0.0.0.0',
      socket: '/tmp/s',
      description: 'd',
      readOnly: true,
      format: 'qcow2',
      persistent: true,
      shared: 4,
      snapshot: true,
      discard: 'unmap',
      aio: 'sync',
      allocationDepth: true,
      pidFile: 'p',
      tlsCreds: 'c',
    });
    expect(o.exports).toEqual([{ name: 'n', path: 'img' }]);
  });

  it('serves several files as several exports', () => {
    expect(options(['a/one.raw', 'two.raw']).exports.map((e) => e.name)).toEqual(['one.raw', 'two.raw']);
    expect(options(['--export', 'x=/a', '--export', 'y=/b=c']).exports).toEqual([
      { name: 'x', path: '/a' },
      { name: 'y', path: '/b=c' },
    ]);
    expect(() => options(['--export', 'x=/a', '--export', 'x=/b'])).toThrow(/used twice/);
    expect(() => options(['-x', 'n', 'a', 'b'])).toThrow(CliError);
  });

  it('rejects bad values with one-line errors', () => {
    expect(() => options([])).toThrow(/no image/);
    expect(() => options(['-p', 'http', 'a'])).toThrow(CliError);
    expect(() => options(['--discard=maybe', 'a'])).toThrow(CliError);
    expect(() => options(['--aio=native', 'a'])).toThrow(CliError);
    expect(options(['--aio=auto', 'a']).aio).toBe('auto');
    expect(options(['--connection-threads=0', 'a']).connectionThreads).toBe(0);
    expect(options(['--connection-threads', '3', 'a']).connectionThreads).toBe(3);
    expect(() => options(['--connection-threads=-1', 'a'])).toThrow(CliError);
    expect(() => options(['--connection-threads=many', 'a'])).toThrow(CliError);
    expect(() => options(['-f', 'vmdk', 'a'])).toThrow(CliError);
    expect(() => options(['-l', 'snap', 'a'])).toThrow(/read-only/);
    expect(parseArgs(['--help'], '1.2.3')).toMatchObject({ kind: 'print' });
    expect(parseArgs(['-V'], '1.2.3')).toEqual({ kind: 'print', text: '1.2.3\n' });
  });

  it('parses -l snapshot forms', () => {
    expect(parseSnapshotSpec('snap1')).toEqual({ idOrName: 'snap1' });
    expect(parseSnapshotSpec('snapshot.id=2,snapshot.name=x')).toEqual({ id: '2', name: 'x' });
    expect(() => parseSnapshotSpec('snapshot.foo=1')).toThrow(CliError);
  });
});
