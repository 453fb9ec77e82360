/**
 * Image locking compatible with QEMU's.
 *
 * QEMU's file driver describes what an opener does with an image by holding shared OFD locks
 * (fcntl F_OFD_SETLK, F_RDLCK) on single bytes: byte `100 + i` means "I use permission i", byte
 * `200 + i` means "I do not let others use permission i". Permissions: 0 consistent read, 1 write,
 * 2 write-unchanged, 3 resize. An opener takes its bytes, then looks (F_OFD_GETLK with a write
 * lock) for anyone denying what it uses or using what it denies, and gives up on a conflict.
 * Taking the same bytes here makes qcowkit and QEMU refuse each other exactly as two QEMU
 * processes would. OFD locks belong to an open file description, so two opens in one process
 * conflict too.
 *
 * Where OFD locks are unavailable the fallback is flock(2) (LOCK_EX for writers, LOCK_SH for
 * readers), which only qcowkit processes see; without the native binding there is no locking.
 */
import { BlockDeviceError } from '../errors.js';
import { errnoError } from './fs-errors.js';
import { F_RDLCK, F_UNLCK, type Libc, LOCK_EX, LOCK_NB, LOCK_SH } from './libc.js';

/** How an opener locks: `exclusive` (default for writers) refuses other writers and plain
 * readers; `shared` (default for readers) refuses writers that deny sharing; `none` takes no
 * lock at all. */
export type LockMode = 'exclusive' | 'shared' | 'none';

/** What actually holds the lock. */
export type LockMechanism = 'ofd' | 'flock' | 'none';

/** Answers meaning "this kernel or file system has no such locks" rather than a conflict. */
const NO_LOCKS: ReadonlySet<string> = new Set(['EINVAL', 'ENOSYS', 'ENOLCK', 'EOPNOTSUPP', 'ENOTSUP']);

/** QEMU's lock byte bases (block/file-posix.c). */
export const RAW_LOCK_PERM_BASE = 100;
export const RAW_LOCK_SHARED_BASE = 200;

/** QEMU permission bit numbers. */
export const PERM_CONSISTENT_READ = 0;
export const PERM_WRITE = 1;
export const PERM_RESIZE = 3;

export interface LockPlan {
  /** Permissions this opener uses. */
  readonly uses: readonly number[];
  /** Permissions this opener denies to everyone else. */
  readonly denies: readonly number[];
}

/** The permissions an opener takes, following QEMU: a writer uses read, write and resize and (in
 * exclusive mode) denies write and resize; a reader uses read and denies write unless it forces
 * sharing (`-U`). */
export function lockPlan(readOnly: boolean, mode: LockMode, forceShare: boolean): LockPlan | undefined {
  if (mode === 'none') return undefined;
  if (readOnly) {
    if (forceShare) return { uses: [PERM_CONSISTENT_READ], denies: [] };
    return {
      uses: [PERM_CONSISTENT_READ],
      denies: mode === 'exclusive' ? [PERM_WRITE, PERM_RESIZE] : [PERM_WRITE],
    };
  }
  return {
    uses: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE],
    denies: mode === 'exclusive' ? [PERM_WRITE, PERM_RESIZE] : [],
  };
}

/** Message for an opener refused because someone else writes. */
export function lockedByWriterMessage(path: string): string {
  return `${path}: locked by another process (opened for writing elsewhere); use forceShare / -U to open read-only anyway`;
}

/** Message for a writer refused because someone else denies writers. */
export function lockedByReaderMessage(path: string): string {
  return `${path}: locked by another process (opened elsewhere without sharing write access); close it first`;
}

/**
 * Takes the lock described by `plan` on `fd`. Returns the mechanism used; throws `EBUSY` on a
 * conflict (the caller closes `fd`, which drops whatever was taken).
 */
export function acquireLock(
  libc: Libc | undefined,
  fd: number,
  path: string,
  plan: LockPlan | undefined,
  forceShare: boolean,
): LockMechanism {
  if (plan === undefined || libc === undefined) return 'none';

  let ofdWorks = true;
  for (const perm of plan.uses) {
    const r = libc.ofdSetLock(fd, F_RDLCK, RAW_LOCK_PERM_BASE + perm, 1);
    if (r.ok) continue;
    if (NO_LOCKS.has(r.code)) {
      // No OFD locks on this kernel or file system: drop what was taken and try flock.
      libc.ofdSetLock(fd, F_UNLCK, RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE + 100 - RAW_LOCK_PERM_BASE);
      ofdWorks = false;
      break;
    }
    if (r.code === 'EAGAIN' || r.code === 'EACCES') {
      // Someone holds a write lock on QEMU's bytes: not QEMU, but still a conflicting user.
      throw new BlockDeviceError('EBUSY', lockedByWriterMessage(path));
    }
    throw errnoError('lock', path, r.code, RAW_LOCK_PERM_BASE + perm);
  }
  if (ofdWorks) {
    for (const perm of plan.denies) {
      const r = libc.ofdSetLock(fd, F_RDLCK, RAW_LOCK_SHARED_BASE + perm, 1);
      if (!r.ok) throw errnoError('lock', path, r.code, RAW_LOCK_SHARED_BASE + perm);
    }
    for (const perm of plan.denies) {
      if (conflicts(libc, fd, path, RAW_LOCK_PERM_BASE + perm)) {
        throw new BlockDeviceError('EBUSY', lockedByWriterMessage(path));
      }
    }
    for (const perm of plan.uses) {
      if (conflicts(libc, fd, path, RAW_LOCK_SHARED_BASE + perm)) {
        throw new BlockDeviceError(
          'EBUSY',
          perm === PERM_WRITE || perm === PERM_RESIZE
            ? lockedByReaderMessage(path)
            : lockedByWriterMessage(path),
        );
      }
    }
    return 'ofd';
  }

  // No OFD locks on this kernel or file system: a whole-file flock, which QEMU does not see.
  if (forceShare) return 'none';
  const writer = plan.uses.includes(PERM_WRITE);
  const r = libc.flock(fd, (writer && plan.denies.length > 0 ? LOCK_EX : LOCK_SH) | LOCK_NB);
  if (r.ok) return 'flock';
  if (r.code === 'EWOULDBLOCK' || r.code === 'EAGAIN') {
    throw new BlockDeviceError('EBUSY', writer ? lockedByReaderMessage(path) : lockedByWriterMessage(path));
  }
  if (NO_LOCKS.has(r.code)) return 'none';
  throw errnoError('lock', path, r.code);
}

function conflicts(libc: Libc, fd: number, path: string, byte: number): boolean {
  const r = libc.ofdTestConflict(fd, byte, 1);
  if (!r.ok) throw errnoError('lock', path, r.code, byte);
  return r.value !== 0;
}
