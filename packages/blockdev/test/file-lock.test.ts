import { describe, expect, it } from 'vitest';
import { isBlockDeviceError } from '../src/errors.js';
import { acquireLock, lockPlan } from '../src/node/file-lock.js';
import { type CallResult, type Libc, LOCK_EX, LOCK_NB, LOCK_SH } from '../src/node/libc.js';

const ok: CallResult = { ok: true, value: 0 };
const failed = (code: string): CallResult => ({ ok: false, errno: 0, code });

/** A libc whose OFD locks do not exist (an old kernel) and whose flock answers `flockResult`. */
function noOfdLibc(flockResult: CallResult, calls: number[]): Libc {
  return {
    lseek: () => failed('ENOSYS'),
    fallocate: async () => failed('ENOSYS'),
    ofdTestConflict: () => failed('EINVAL'),
    ofdSetLock: () => failed('EINVAL'),
    flock: (_fd, operation) => {
      calls.push(operation);
      return flockResult;
    },
    blockDeviceSize: () => failed('ENOTTY'),
  };
}

describe('lock plans (QEMU permission bytes)', () => {
  it('writers use read, write and resize; exclusive ones deny write and resize', () => {
    expect(lockPlan(false, 'exclusive', false)).toEqual({ uses: [0, 1, 3], denies: [1, 3] });
    expect(lockPlan(false, 'shared', false)).toEqual({ uses: [0, 1, 3], denies: [] });
  });
  it('readers use read and deny write unless they force sharing', () => {
    expect(lockPlan(true, 'shared', false)).toEqual({ uses: [0], denies: [1] });
    expect(lockPlan(true, 'shared', true)).toEqual({ uses: [0], denies: [] });
    expect(lockPlan(true, 'none', false)).toBeUndefined();
  });
});

describe('flock fallback where OFD locks are missing', () => {
  it('takes LOCK_EX for an exclusive writer and LOCK_SH for a reader', () => {
    const calls: number[] = [];
    expect(acquireLock(noOfdLibc(ok, calls), 3, '/x', lockPlan(false, 'exclusive', false), false)).toBe(
      'flock',
    );
    expect(acquireLock(noOfdLibc(ok, calls), 3, '/x', lockPlan(true, 'shared', false), false)).toBe('flock');
    expect(calls).toEqual([LOCK_EX | LOCK_NB, LOCK_SH | LOCK_NB]);
  });

  it('turns a held lock into EBUSY and a file system without locks into no lock', () => {
    const calls: number[] = [];
    let error: unknown;
    try {
      acquireLock(noOfdLibc(failed('EWOULDBLOCK'), calls), 3, '/x', lockPlan(true, 'shared', false), false);
    } catch (e) {
      error = e;
    }
    expect(isBlockDeviceError(error, 'EBUSY')).toBe(true);
    expect((error as Error).message).toContain(
      '/x: locked by another process (opened for writing elsewhere)',
    );
    expect(
      acquireLock(noOfdLibc(failed('ENOLCK'), calls), 3, '/x', lockPlan(false, 'exclusive', false), false),
    ).toBe('none');
    expect(acquireLock(noOfdLibc(ok, calls), 3, '/x', lockPlan(true, 'shared', true), true)).toBe('none');
  });
});
