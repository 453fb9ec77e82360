/**
 * Drives a BlockDevice with the request pattern of `qemu-img bench`: `count` requests of `size`
 * bytes, `depth` in flight, the first at `offset`, each next one `step` bytes further, wrapping
 * modulo the device size (QEMU 7.2's rule). Returns the elapsed seconds.
 */
export async function benchDevice(device, { count, depth, size, step = size, offset = 0, write = false }) {
  const buffers = Array.from({ length: depth }, () => new Uint8Array(size).fill(write ? 0xa5 : 0));
  let next = offset;
  let issued = 0;
  const started = performance.now();
  const lane = async (buffer) => {
    while (issued < count) {
      issued++;
      const position = next;
      next = (next + step) % device.size;
      if (write) await device.write(position, buffer);
      else await device.readInto(buffer, position);
    }
  };
  await Promise.all(buffers.map(lane));
  return (performance.now() - started) / 1000;
}
