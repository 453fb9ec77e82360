export { DETECT_BYTES, detectFormat, type ImageFormat } from '../detect.js';
export { nodeCodecs } from './node-codecs.js';
export { type ChainLayer, type OpenedImage, type OpenImageOptions, openImage } from './open-image.js';
