export { TableCache } from './table-cache.js';
