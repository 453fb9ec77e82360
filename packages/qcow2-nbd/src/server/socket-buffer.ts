/**
 * A larger send buffer for unix sockets. Linux gives a unix stream socket about 208 KiB of send
 * buffer (net.core.wmem_default) and, unlike TCP, never grows it: a 256 KiB READ reply then leaves
 * in two writes, each waiting for the client to drain the socket, so the server's thread sleeps
 * and wakes about once per reply. With a few MiB (capped by net.core.wmem_max) replies leave in
 * one write and the event loop wakes far less (nbdcopy out of a raw export: about 15% less server
 * CPU). Node has no call for SO_SNDBUF on stream sockets; setsockopt is reached through blockdev's
 * libc binding (koffi). Optional: without it nothing changes.
 *
 * The kernel caps the size at net.core.wmem_max: a stock kernel's 212 992 bytes leave the default
 * unchanged; hosts serving NBD raise it (this one has 4 MiB). Replies in that buffer are outside the
 * transmission's in-flight bound (they have left the process): a client that stops reading holds
 * up to twice the granted size of kernel memory per connection, as with any TCP socket's autotuning.
 *
 * Linux only (x86_64 and aarch64 share these constants).
 */
import { loadLibc } from '@qcowkit/blockdev/node';

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_DOMAIN = 39;
const AF_UNIX = 1;

/** The send buffer asked for on unix sockets (the kernel caps it at net.core.wmem_max). */
const UNIX_SEND_BUFFER = 4 * 1024 * 1024;

/**
 * Asks for a send buffer of `bytes` on `fd` when it is a unix socket. Returns the size the kernel
 * reports afterwards (it doubles what it grants, for its bookkeeping), or undefined when nothing
 * was changed (not a unix socket, no libc binding, or the call failed).
 */
export function enlargeUnixSendBuffer(fd: number, bytes = UNIX_SEND_BUFFER): number | undefined {
  const libc = loadLibc();
  const get = libc?.getSocketInt;
  const set = libc?.setSocketInt;
  if (get === undefined || set === undefined || !Number.isSafeInteger(fd) || fd < 0) return undefined;
  const domain = get(fd, SOL_SOCKET, SO_DOMAIN);
  if (!domain.ok || domain.value !== AF_UNIX) return undefined;
  if (!set(fd, SOL_SOCKET, SO_SNDBUF, bytes).ok) return undefined;
  const granted = get(fd, SOL_SOCKET, SO_SNDBUF);
  return granted.ok ? granted.value : undefined;
}
