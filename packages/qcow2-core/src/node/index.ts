export { type CreateImageOptions, createImage } from './create-image.js';
export { nodeCodecs } from './node-codecs.js';
export { type ChainLayer, type OpenedImage, type OpenImageOptions, openImage } from './open-image.js';
