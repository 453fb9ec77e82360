/**
 * A larger send buffer for unix sockets. Linux gives a unix stream socket about 208 KiB of send
 * buffer (net.core.wmem_default) and, unlike TCP, never grows it: a 256 KiB READ reply then leaves
 * in two writes, each waiting for the client to drain the socket, so the server's thread sleeps
 * and wakes about once per reply. With a few MiB (capped by net.core.wmem_max) replies leave in
 * one write and the event loop wakes far less (nbdcopy out of a raw export: about 15% less server
 * CPU). Node has no call for SO_SNDBUF on stream sockets; setsockopt is reached through koffi, as
 * blockdev reaches lseek and fallocate. Optional: without koffi nothing changes.
 *
 * The kernel caps the size at net.core.wmem_max: a stock kernel's 212 992 bytes leave the default
 * unchanged; hosts serving NBD raise it (this one has 4 MiB). Replies in that buffer are outside the
 * transmission's in-flight bound (they have left the process): a client that stops reading holds
 * up to twice the granted size of kernel memory per connection, as with any TCP socket's autotuning.
 *
 * Linux only (x86_64 and aarch64 share these constants).
 */
import { createRequire } from 'node:module';
import { arch, platform } from 'node:os';

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_DOMAIN = 39;
const AF_UNIX = 1;

/** The send buffer asked for on unix sockets (the kernel caps it at net.core.wmem_max). */
export const UNIX_SEND_BUFFER = 4 * 1024 * 1024;

interface SocketCalls {
  setsockopt(fd: number, level: number, name: number, value: Buffer, length: number): number;
  getsockopt(fd: number, level: number, name: number, value: Buffer, length: number[]): number;
}

let cached: SocketCalls | null | undefined;

function load(): SocketCalls | null {
  if (platform() !== 'linux' || (arch() !== 'x64' && arch() !== 'arm64')) return null;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const lib = koffi.load('libc.so.6');
    return {
      setsockopt: lib.func('int setsockopt(int, int, int, void *, int)'),
      getsockopt: lib.func('int getsockopt(int, int, int, _Out_ void *, _Inout_ int *)'),
    } as SocketCalls;
  } catch {
    return null;
  }
}

/** SO_DOMAIN of `fd`, or undefined when it cannot be read. */
function socketDomain(calls: SocketCalls, fd: number): number | undefined {
  const value = Buffer.alloc(4);
  if (calls.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, value, [4]) !== 0) return undefined;
  return value.readInt32LE(0);
}

/**
 * Asks for a send buffer of `bytes` on `fd` when it is a unix socket. Returns the size the kernel
 * reports afterwards (it doubles what it grants, for its bookkeeping), or undefined when nothing
 * was changed (not a unix socket, no koffi, or the call failed).
 */
export function enlargeUnixSendBuffer(fd: number, bytes = UNIX_SEND_BUFFER): number | undefined {
  if (cached === undefined) cached = load();
  const calls = cached;
  if (calls === null || !Number.isSafeInteger(fd) || fd < 0) return undefined;
  if (socketDomain(calls, fd) !== AF_UNIX) return undefined;
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes, 0);
  if (calls.setsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, 4) !== 0) return undefined;
  const granted = Buffer.alloc(4);
  if (calls.getsockopt(fd, SOL_SOCKET, SO_SNDBUF, granted, [4]) !== 0) return undefined;
  return granted.readInt32LE(0);
}
