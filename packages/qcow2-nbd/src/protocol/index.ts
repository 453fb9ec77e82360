/** The NBD wire format: constants, handshake codecs, request and reply codecs, the byte reader. */
export { ByteReader, StreamEndedError } from './byte-reader.js';
export * from './constants.js';
export * from './options.js';
export * from './replies.js';
export * from './requests.js';
