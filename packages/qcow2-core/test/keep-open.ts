/** A device wrapper the write tests share to reopen an image on the same storage. */
import type { BlockDevice } from '@qcowkit/blockdev';

/** `device` with a close() that only flushes, so the storage can be opened again. */
export function keepOpen(device: BlockDevice): BlockDevice {
  return new Proxy(device, {
    get(target, property) {
      if (property === 'close') return () => target.flush();
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
