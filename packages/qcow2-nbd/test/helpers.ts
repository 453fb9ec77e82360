/** Small helpers shared by the server's tests. */
import type { BlockDevice } from '@qcowkit/blockdev';

/** A device that forwards to `base` except for the members given. */
export function wrap(base: BlockDevice, overrides: Partial<BlockDevice>): BlockDevice {
  return new Proxy(base, {
    get(target, key) {
      if (key in overrides) return overrides[key as keyof BlockDevice];
      const value = Reflect.get(target, key, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

/** The (length, flags) descriptors of a block status chunk's payload (after its 4-byte context id). */
export function descriptors(payload: Buffer): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 4; i < payload.length; i += 8)
    out.push([payload.readUInt32BE(i), payload.readUInt32BE(i + 4)]);
  return out;
}
