import { SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { fileIoOptions, isMemoryBacked } from '../src/cli/file-io.js';

describe('--aio', () => {
  it('threads and sync are fixed; auto goes inline only on memory-backed file systems', async () => {
    expect(await fileIoOptions('threads', '/dev/shm')).toEqual({ syncIoMaxBytes: 0 });
    expect(await fileIoOptions('sync', '/proc')).toEqual({ syncIoMaxBytes: SYNC_IO_MAX_BYTES });
    // /dev/shm is tmpfs on Linux; /proc is not memory-backed storage; a missing path is unknown.
    expect(await isMemoryBacked('/dev/shm')).toBe(true);
    expect(await isMemoryBacked('/proc')).toBe(false);
    expect(await isMemoryBacked('/no/such/file')).toBe(false);
    expect(await fileIoOptions('auto', '/dev/shm')).toEqual({ syncIoMaxBytes: SYNC_IO_MAX_BYTES });
    expect(await fileIoOptions('auto', '/proc')).toEqual({ syncIoMaxBytes: 0 });
  });
});
