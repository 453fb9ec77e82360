/**
 * zstd compression of clusters with @hpcc-js/wasm-zstd (the WebAssembly build qcow2-core uses), at
 * zstd's default level 3 as QEMU compresses. Each cluster is one frame.
 *
 * The package's `compress()` copies its result out of the WebAssembly heap through a JavaScript
 * array (`[...view]`), which costs about 80 ns a byte: an incompressible 64 KiB cluster took 5 ms,
 * 40 times the compression itself. So, when the module exposes them (checked at load), the encoder
 * calls the module's compress function on heap buffers it allocates once, and copies each frame
 * straight into the caller's output; otherwise it falls back to the public `compress()`.
 */
import { Zstd } from '@hpcc-js/wasm-zstd';

/** zstd's default level (ZSTD_CLEVEL_DEFAULT), which QEMU's qcow2 driver uses. */
const ZSTD_LEVEL = 3;

export interface ZstdEncoder {
  /** Compresses `input` as one frame; returns the frame, or undefined when it is not shorter than
   * `limit`. The returned view is valid until the next call. */
  compress(input: Uint8Array, limit: number): Uint8Array | undefined;
}

interface WasmModule {
  readonly HEAPU8: Uint8Array;
  _malloc(size: number): number;
  _free(pointer: number): void;
}
interface ZstdClass {
  compress(dst: number, dstCapacity: number, src: number, srcSize: number, level: number): number;
  compressBound(size: number): number;
  isError(code: number): boolean;
  getErrorName(code: number): string;
}

/** The module internals the fast path needs, or undefined when this build does not have them. */
function internalsOf(zstd: Zstd): { module: WasmModule; zstdClass: ZstdClass } | undefined {
  const raw = zstd as unknown as { _mainModule?: { _module?: WasmModule }; _zstdClass?: ZstdClass };
  const module = raw._mainModule?._module;
  const zstdClass = raw._zstdClass;
  if (
    module === undefined ||
    zstdClass === undefined ||
    typeof module._malloc !== 'function' ||
    typeof module._free !== 'function' ||
    !(module.HEAPU8 instanceof Uint8Array) ||
    typeof zstdClass.compress !== 'function' ||
    typeof zstdClass.compressBound !== 'function' ||
    typeof zstdClass.isError !== 'function'
  ) {
    return undefined;
  }
  return { module, zstdClass };
}

let loaded: Promise<ZstdEncoder> | undefined;

/** Loads the WebAssembly module once per thread. */
export function loadZstdEncoder(): Promise<ZstdEncoder> {
  loaded ??= Zstd.load().then((zstd) => {
    const internals = internalsOf(zstd);
    if (internals === undefined) {
      return {
        compress(input, limit) {
          const frame = zstd.compress(input, ZSTD_LEVEL);
          return frame.length < limit ? frame : undefined;
        },
      };
    }
    const { module, zstdClass } = internals;
    let capacity = 0;
    let source = 0;
    let target = 0;
    let targetCapacity = 0;
    return {
      compress(input, limit) {
        if (input.length > capacity) {
          if (capacity > 0) {
            module._free(source);
            module._free(target);
          }
          capacity = input.length;
          targetCapacity = zstdClass.compressBound(capacity);
          source = module._malloc(capacity);
          target = module._malloc(targetCapacity);
        }
        // HEAPU8 is replaced when the heap grows: read it after any allocation.
        module.HEAPU8.set(input, source);
        const length = zstdClass.compress(target, targetCapacity, source, input.length, ZSTD_LEVEL);
        if (zstdClass.isError(length)) throw new Error(`zstd: ${zstdClass.getErrorName(length)}`);
        return length < limit ? module.HEAPU8.subarray(target, target + length) : undefined;
      },
    };
  });
  return loaded;
}
