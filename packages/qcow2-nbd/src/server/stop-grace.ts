/**
 * How long a graceful stop gives a client to take the replies still owed to it, in milliseconds:
 * past it the connection is dropped, whether it is served on the event loop or on a connection
 * thread, so a client that never reads cannot hold the server up.
 */
export const STOP_GRACE_MS = 2000;
