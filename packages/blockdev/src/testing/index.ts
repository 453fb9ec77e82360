/**
 * The BlockDevice conformance kit: property-based tests any BlockDevice can run against a simple
 * in-memory reference model. Built on vitest and fast-check (optional peer dependencies).
 *
 * ```ts
 * import { describeBlockDeviceConformance } from '@qcowkit/blockdev/testing';
 * describeBlockDeviceConformance({ name: 'my device', create: async (size) => new MyDevice(size) });
 * ```
 */
import fc from 'fast-check';
import { describe, it } from 'vitest';
import type { BlockDevice, Extent } from '../block-device.js';
import { DeviceModel } from './model.js';

export { DeviceModel } from './model.js';

export interface ConformanceOptions {
  /** Shown in the test names. */
  readonly name: string;
  /** A new, writable, zero-filled (see `initialContent`) device of at least `size` bytes (its `size` is what is tested,
   * so a device that rounds sizes up is fine). */
  create(size: number): Promise<BlockDevice>;
  /** What a device from `create(size)` holds at first, when not zeros: a prefix of at most
   * `size` bytes (zeros after it). Lets layered devices run the kit over non-zero lower layers. */
  initialContent?(size: number): Uint8Array;
  /** Closes `device` cleanly and opens the same storage again; enables `reopen` steps. */
  reopen?(device: BlockDevice): Promise<BlockDevice>;
  /** A read-only device holding `content`; enables the read-only tests. */
  createReadOnly?(content: Uint8Array): Promise<BlockDevice>;
  /** Device sizes to test (default: 1 B, 4097 B, about 193 KiB, and 4 GiB + 1.5 KiB). */
  readonly sizes?: readonly number[];
  /** fast-check runs per property (default 40; the environment variable
   * `QCOWKIT_CONFORMANCE_RUNS` raises it). */
  readonly numRuns?: number;
  /** Longest random operation sequence (default 30). */
  readonly maxOperations?: number;
  /** The device implements `resize`: test it, and mix resizes into the random sequences. */
  readonly supportsResize?: boolean;
  /** The smallest size the random sequences resize to (default 0), for devices that refuse to
   * shrink below some size (e.g. a qcow2 image holding persistent bitmaps cannot be empty). */
  readonly minResizeSize?: number;
  /** After `discard`, the range reads as zeros (default: `capabilities.discard`, since a device
   * without real discard ignores it). When false, the kit accepts zeros, the previous bytes, or
   * the initial content (a layered device showing its lower layer). */
  readonly discardReadsZero?: boolean;
  /** Per-test timeout in milliseconds (default: vitest's). */
  readonly timeout?: number;
  /** fast-check seed, to replay a failure (default: random; also `QCOWKIT_CONFORMANCE_SEED`). */
  readonly seed?: number;
}

/** One step of a random sequence. Offsets and lengths are clamped to the device's current size
 * when the step runs (a resize may have shrunk it). */
export type ConformanceOperation =
  | {
      readonly kind: 'write';
      readonly offset: number;
      readonly length: number;
      readonly seed: number;
      readonly fua: boolean;
    }
  | {
      readonly kind: 'writeZeroes';
      readonly offset: number;
      readonly length: number;
      readonly mayUnmap: boolean;
      readonly fua: boolean;
      /** Devices without `capabilities.fastZero` may reject with `ENOTSUP` and change nothing. */
      readonly fastOnly: boolean;
    }
  | { readonly kind: 'discard'; readonly offset: number; readonly length: number }
  | { readonly kind: 'read'; readonly offset: number; readonly length: number; readonly into: boolean }
  | { readonly kind: 'blockStatus'; readonly offset: number; readonly length: number }
  | { readonly kind: 'flush' }
  | { readonly kind: 'reopen' }
  | { readonly kind: 'resize'; readonly size: number };

const DEFAULT_SIZES = [1, 4097, 197_635, 2 ** 32 + 1536];
const DEFAULT_RUNS = 40;
const DEFAULT_MAX_OPERATIONS = 30;
/** Devices up to this size are read back whole at the end of each sequence. */
const FULL_VERIFY_LIMIT = 4 * 1024 * 1024;
/** Otherwise each changed range is read back with this margin on either side. */
const VERIFY_MARGIN = 4096;
const READ_PIECE = 1024 * 1024;

function environment(name: string): string | undefined {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env;
  return env?.[name];
}

function runsFor(options: Pick<ConformanceOptions, 'numRuns'>): number {
  const base = options.numRuns ?? DEFAULT_RUNS;
  const fromEnvironment = Number(environment('QCOWKIT_CONFORMANCE_RUNS'));
  return Number.isSafeInteger(fromEnvironment) && fromEnvironment > base ? fromEnvironment : base;
}

function seedFor(options: Pick<ConformanceOptions, 'seed'>): number | undefined {
  if (options.seed !== undefined) return options.seed;
  const fromEnvironment = Number(environment('QCOWKIT_CONFORMANCE_SEED'));
  return environment('QCOWKIT_CONFORMANCE_SEED') !== undefined && Number.isSafeInteger(fromEnvironment)
    ? fromEnvironment
    : undefined;
}

/** Deterministic test data: never zero except, for one seed in four, a zero run in the middle
 * (so devices that detect zeros are exercised). */
export function patternBytes(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let state = (Math.imul(seed + 1, 2654435761) ^ 0x9e3779b9) >>> 0 || 1;
  for (let index = 0; index < length; index++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    out[index] = (state & 0xff) | 1;
  }
  if (seed % 4 === 0) out.fill(0, length >>> 2, length - (length >>> 2));
  return out;
}

function clamp(value: number, low: number, high: number): number {
  return Math.min(Math.max(value, low), high);
}

/** Offsets that like boundaries: 0, the end, and multiples of 512 / 4 KiB / 64 KiB give or take
 * a couple of bytes. */
function offsetArbitrary(size: number): fc.Arbitrary<number> {
  if (size === 0) return fc.constant(0);
  return fc.oneof(
    fc.integer({ min: 0, max: size }),
    fc
      .tuple(
        fc.integer({ min: 0, max: size }),
        fc.constantFrom(512, 4096, 65536),
        fc.integer({ min: -2, max: 2 }),
      )
      .map(([base, alignment, delta]) => clamp(Math.floor(base / alignment) * alignment + delta, 0, size)),
    fc.integer({ min: 0, max: 3 }).map((back) => Math.max(0, size - back)),
    fc.constant(0),
  );
}

function lengthArbitrary(): fc.Arbitrary<number> {
  return fc.oneof(
    fc.constant(0),
    fc.integer({ min: 1, max: 16 }),
    fc.constantFrom(511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537),
    fc.integer({ min: 1, max: 140_000 }),
  );
}

function rangeArbitrary(size: number): fc.Arbitrary<{ offset: number; length: number }> {
  return fc
    .tuple(offsetArbitrary(size), lengthArbitrary())
    .map(([offset, length]) => ({ offset, length: Math.min(length, size - offset) }));
}

/** Random operation sequences for a device of `size` bytes. */
export function operationsArbitrary(
  size: number,
  options: { reopen?: boolean; resize?: boolean; minResizeSize?: number; maxOperations?: number } = {},
): fc.Arbitrary<ConformanceOperation[]> {
  const range = rangeArbitrary(size);
  const choices: { arbitrary: fc.Arbitrary<ConformanceOperation>; weight: number }[] = [
    {
      weight: 6,
      arbitrary: fc
        .tuple(range, fc.nat(), fc.boolean())
        .map(([r, seed, fua]) => ({ kind: 'write', ...r, seed, fua: fua && seed % 8 === 0 })),
    },
    {
      weight: 2,
      arbitrary: fc.tuple(range, fc.boolean(), fc.boolean(), fc.nat(3)).map(([r, mayUnmap, fua, fast]) => ({
        kind: 'writeZeroes',
        ...r,
        mayUnmap,
        fua,
        fastOnly: fast === 0,
      })),
    },
    { weight: 2, arbitrary: range.map((r) => ({ kind: 'discard', ...r })) },
    {
      weight: 4,
      arbitrary: fc.tuple(range, fc.boolean()).map(([r, into]) => ({ kind: 'read', ...r, into })),
    },
    { weight: 2, arbitrary: range.map((r) => ({ kind: 'blockStatus', ...r })) },
    { weight: 1, arbitrary: fc.constant({ kind: 'flush' }) },
  ];
  if (options.reopen) choices.push({ weight: 1, arbitrary: fc.constant({ kind: 'reopen' }) });
  if (options.resize) {
    const largest = Math.max(2 * size, 1);
    choices.push({
      weight: 1,
      arbitrary: fc.oneof(fc.integer({ min: 0, max: largest }), offsetArbitrary(size)).map((newSize) => ({
        kind: 'resize',
        size: Math.max(newSize, options.minResizeSize ?? 0),
      })),
    });
  }
  return fc.array(fc.oneof(...choices), {
    minLength: 1,
    maxLength: options.maxOperations ?? DEFAULT_MAX_OPERATIONS,
  });
}

function discardReadsZero(options: ConformanceOptions, device: BlockDevice): boolean {
  return options.discardReadsZero ?? device.capabilities.discard;
}

function describeOperation(operation: ConformanceOperation): string {
  return JSON.stringify(operation);
}

function errorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** Fails unless `promise` rejects with an error whose `code` is one of `codes`. */
export async function expectRejection(
  promise: Promise<unknown>,
  codes: readonly string[],
  what: string,
): Promise<void> {
  let outcome: unknown;
  try {
    await promise;
  } catch (error) {
    outcome = error;
    if (codes.includes(errorCode(error) ?? '')) return;
  }
  const got =
    outcome === undefined ? 'it succeeded' : `it rejected with ${errorCode(outcome) ?? String(outcome)}`;
  throw new Error(`${what}: expected a rejection with ${codes.join(' or ')}, but ${got}`);
}

/** Reads `[offset, offset + length)` and fails on the first byte the model does not allow. */
async function verify(
  device: BlockDevice,
  model: DeviceModel,
  offset: number,
  length: number,
  context: string,
) {
  for (let position = offset; position < offset + length; position += READ_PIECE) {
    const count = Math.min(READ_PIECE, offset + length - position);
    const actual = await device.read(position, count);
    compare(model, position, actual, context);
  }
}

function compare(model: DeviceModel, offset: number, actual: Uint8Array, context: string): void {
  const index = model.firstMismatch(offset, actual);
  if (index >= 0) {
    const expected = model.expected(offset + index, 1)[0];
    throw new Error(
      `${context}: byte at ${offset + index} reads ${actual[index]}, expected ${expected} (read of ${actual.length} bytes at ${offset})`,
    );
  }
}

/** Checks one `blockStatus` answer's shape: contiguous from `offset`, inside the range. */
function checkExtentShape(
  extents: readonly Extent[],
  offset: number,
  length: number,
  context: string,
): number {
  if (extents.length === 0)
    throw new Error(`${context}: blockStatus(${offset}, ${length}) returned no extent`);
  let position = offset;
  for (const extent of extents) {
    if (extent.offset !== position) {
      throw new Error(`${context}: blockStatus extent starts at ${extent.offset}, expected ${position}`);
    }
    if (!Number.isSafeInteger(extent.length) || extent.length <= 0) {
      throw new Error(`${context}: blockStatus extent at ${position} has length ${extent.length}`);
    }
    if (!Number.isSafeInteger(extent.depth) || extent.depth < 0) {
      throw new Error(`${context}: blockStatus extent at ${position} has depth ${extent.depth}`);
    }
    position += extent.length;
  }
  if (position > offset + length) {
    throw new Error(`${context}: blockStatus(${offset}, ${length}) ran past the range to ${position}`);
  }
  return position;
}

/** Walks `[offset, offset + length)` with blockStatus and checks that nothing holding non-zero
 * data is called zero or a hole. */
async function checkBlockStatus(
  device: BlockDevice,
  model: DeviceModel,
  offset: number,
  length: number,
  context: string,
): Promise<void> {
  const end = offset + length;
  let position = offset;
  for (let calls = 0; position < end; calls++) {
    if (calls > 100_000) throw new Error(`${context}: blockStatus makes no progress at ${position}`);
    const extents = await device.blockStatus(position, end - position);
    const reached = checkExtentShape(extents, position, end - position, context);
    for (const extent of extents) {
      const readsZero = extent.zero || (!extent.data && !extent.present);
      if (readsZero && !model.mayAllBeZero(extent.offset, extent.length)) {
        throw new Error(
          `${context}: blockStatus calls ${extent.length} bytes at ${extent.offset} zero or a hole, but they hold data`,
        );
      }
    }
    position = reached;
  }
}

/** The state of one model-based run. */
class ModelRun {
  device: BlockDevice;
  readonly model: DeviceModel;
  /** Ranges changed, for the final read-back of large devices. */
  readonly changed: [number, number][] = [];

  constructor(
    device: BlockDevice,
    private readonly options: ConformanceOptions,
  ) {
    this.device = device;
    const content = options.initialContent?.(device.size);
    this.model = new DeviceModel(device.size, content);
    if (content !== undefined) this.changed.push([0, content.length]);
  }

  async step(operation: ConformanceOperation, index: number): Promise<void> {
    const context = `step ${index} ${describeOperation(operation)}`;
    const device = this.device;
    const size = this.model.size;
    if (device.size !== size) throw new Error(`${context}: device size is ${device.size}, expected ${size}`);
    const offset = 'offset' in operation ? Math.min(operation.offset, size) : 0;
    const length = 'length' in operation ? Math.min(operation.length, size - offset) : 0;
    switch (operation.kind) {
      case 'write': {
        const data = patternBytes(operation.seed, length);
        await device.write(offset, data, { fua: operation.fua });
        this.model.write(offset, data);
        this.changed.push([offset, offset + length]);
        break;
      }
      case 'writeZeroes':
        try {
          await device.writeZeroes(offset, length, {
            mayUnmap: operation.mayUnmap,
            fua: operation.fua,
            fastOnly: operation.fastOnly,
          });
        } catch (error) {
          // Without fast zeroing, a fastOnly request may be refused; nothing changes then.
          if (operation.fastOnly && !device.capabilities.fastZero && errorCode(error) === 'ENOTSUP') break;
          throw error;
        }
        this.model.zero(offset, length);
        this.changed.push([offset, offset + length]);
        break;
      case 'discard':
        await device.discard(offset, length);
        if (discardReadsZero(this.options, device)) this.model.zero(offset, length);
        else this.model.discardMaybe(offset, length);
        this.changed.push([offset, offset + length]);
        break;
      case 'read': {
        let actual: Uint8Array;
        if (operation.into) {
          // Read into the middle of a larger buffer: devices must honour subarrays.
          const backing = new Uint8Array(length + 16).fill(0xa5);
          actual = backing.subarray(8, 8 + length);
          await device.readInto(actual, offset);
          if (
            backing.subarray(0, 8).some((byte) => byte !== 0xa5) ||
            backing.subarray(8 + length).some((b) => b !== 0xa5)
          ) {
            throw new Error(`${context}: readInto wrote outside the buffer it was given`);
          }
        } else {
          actual = await device.read(offset, length);
        }
        if (actual.length !== length) throw new Error(`${context}: read returned ${actual.length} bytes`);
        compare(this.model, offset, actual, context);
        break;
      }
      case 'blockStatus':
        if (length > 0) await checkBlockStatus(device, this.model, offset, length, context);
        break;
      case 'flush':
        await device.flush();
        break;
      case 'reopen':
        if (this.options.reopen === undefined) break;
        this.device = await this.options.reopen(device);
        if (this.device.size !== size) {
          throw new Error(`${context}: reopened device has size ${this.device.size}, expected ${size}`);
        }
        break;
      case 'resize':
        await device.resize(operation.size);
        if (device.size !== operation.size) {
          throw new Error(`${context}: size is ${device.size} after resize to ${operation.size}`);
        }
        this.model.resize(operation.size);
        break;
    }
  }

  /** Reads back everything (small devices) or every changed range with a margin (large ones). */
  async verifyAll(): Promise<void> {
    const size = this.model.size;
    const context = 'final read-back';
    if (size <= FULL_VERIFY_LIMIT) {
      await verify(this.device, this.model, 0, size, context);
      return;
    }
    for (const [from, to] of this.changed) {
      const start = clamp(from - VERIFY_MARGIN, 0, size);
      const end = clamp(to + VERIFY_MARGIN, 0, size);
      if (start < end) await verify(this.device, this.model, start, end - start, context);
    }
    await verify(this.device, this.model, Math.max(0, size - 1), Math.min(1, size), context);
  }
}

/** Runs `operations` on a fresh device from `options.create(size)` and checks it against the
 * model after every step and at the end. Rejects with a description of the first difference. */
export async function runConformanceSequence(
  options: ConformanceOptions,
  size: number,
  operations: readonly ConformanceOperation[],
): Promise<void> {
  const run = new ModelRun(await options.create(size), options);
  try {
    for (const [index, operation] of operations.entries()) await run.step(operation, index);
    await run.verifyAll();
  } finally {
    await run.device.close();
  }
}

/** The model-based property for one device size; usable directly with `fc.assert`. */
export function modelProperty(options: ConformanceOptions, size: number) {
  return fc.asyncProperty(
    operationsArbitrary(size, {
      reopen: options.reopen !== undefined,
      resize: options.supportsResize ?? false,
      minResizeSize: options.minResizeSize,
      maxOperations: options.maxOperations,
    }),
    (operations) => runConformanceSequence(options, size, operations),
  );
}

type ConcurrentKind = 'write' | 'writeZeroes' | 'discard' | 'read' | 'blockStatus';

/** Several non-overlapping requests issued at once (with a flush among them): each must act as if
 * alone. Requests are cut from the device at random points, each at most 256 KiB long. */
export function concurrencyProperty(options: ConformanceOptions, size: number) {
  const request = fc.record({
    cut: fc.integer({ min: 0, max: Math.max(0, size - 1) }),
    kind: fc.constantFrom<ConcurrentKind>('write', 'write', 'writeZeroes', 'discard', 'read', 'blockStatus'),
    seed: fc.nat(),
  });
  return fc.asyncProperty(fc.array(request, { minLength: 1, maxLength: 8 }), async (requests) => {
    const device = await options.create(size);
    try {
      const model = new DeviceModel(device.size, options.initialContent?.(device.size));
      const deviceSize = device.size;
      const sorted = [...requests].sort((a, b) => a.cut - b.cut);
      const ranges = sorted
        .map((entry, index) => {
          const next = sorted[index + 1]?.cut ?? deviceSize;
          return { ...entry, offset: entry.cut, length: Math.min(next - entry.cut, 256 * 1024) };
        })
        .filter((entry) => entry.length > 0 && entry.offset < deviceSize);
      // Known content first, one request at a time.
      for (const range of ranges) {
        const data = patternBytes(range.seed + 1, range.length);
        await device.write(range.offset, data);
        model.write(range.offset, data);
      }
      const work: Promise<void>[] = [device.flush()];
      for (const range of ranges) {
        const context = `concurrent ${range.kind} of ${range.length} bytes at ${range.offset}`;
        switch (range.kind) {
          case 'write': {
            const data = patternBytes(range.seed + 2, range.length);
            model.write(range.offset, data);
            work.push(device.write(range.offset, data));
            break;
          }
          case 'writeZeroes':
            model.zero(range.offset, range.length);
            work.push(device.writeZeroes(range.offset, range.length, { mayUnmap: range.seed % 2 === 0 }));
            break;
          case 'discard':
            if (discardReadsZero(options, device)) model.zero(range.offset, range.length);
            else model.discardMaybe(range.offset, range.length);
            work.push(device.discard(range.offset, range.length));
            break;
          case 'read': {
            // Nobody else touches this range, so it reads what was written before.
            const expected = model.expected(range.offset, range.length);
            work.push(
              device.read(range.offset, range.length).then((actual) => {
                const probe = new DeviceModel(deviceSize);
                probe.write(range.offset, expected);
                compare(probe, range.offset, actual, context);
              }),
            );
            break;
          }
          case 'blockStatus': {
            const snapshot = new DeviceModel(deviceSize);
            snapshot.write(range.offset, model.expected(range.offset, range.length));
            work.push(checkBlockStatus(device, snapshot, range.offset, range.length, context));
            break;
          }
        }
      }
      await Promise.all(work);
      for (const range of ranges) {
        await verify(device, model, range.offset, range.length, `after concurrent requests`);
      }
    } finally {
      await device.close();
    }
  });
}

/** Overlapping writes, zeroes and discards issued at once: afterwards every byte holds what one
 * of the competing requests (or the earlier content) left there, and the device still works. */
export function overlapProperty(options: ConformanceOptions, size: number) {
  const window = Math.min(size, 3 * 65536);
  const request = fc.record({
    offset: fc.integer({ min: 0, max: Math.max(0, window - 1) }),
    length: fc.oneof(fc.integer({ min: 1, max: 600 }), fc.integer({ min: 1, max: window })),
    kind: fc.constantFrom<'write' | 'writeZeroes' | 'discard'>('write', 'write', 'writeZeroes', 'discard'),
    seed: fc.nat(),
  });
  return fc.asyncProperty(
    fc.integer({ min: 0, max: Math.max(0, size - window) }),
    fc.array(request, { minLength: 2, maxLength: 6 }),
    async (base, requests) => {
      const device = await options.create(size);
      try {
        const model = new DeviceModel(device.size, options.initialContent?.(device.size));
        const prior = model.expected(base, window);
        const candidates: { from: number; to: number; bytes: Uint8Array | undefined; discard: boolean }[] =
          [];
        const work: Promise<void>[] = [];
        for (const entry of requests) {
          const from = base + entry.offset;
          const length = Math.min(entry.length, base + window - from);
          if (entry.kind === 'write') {
            const data = patternBytes(entry.seed, length);
            candidates.push({ from, to: from + length, bytes: data, discard: false });
            work.push(device.write(from, data));
          } else {
            candidates.push({ from, to: from + length, bytes: undefined, discard: entry.kind === 'discard' });
            work.push(
              entry.kind === 'discard' ? device.discard(from, length) : device.writeZeroes(from, length),
            );
          }
        }
        await Promise.all(work);
        const actual = await device.read(base, window);
        const initial = options.initialContent?.(device.size);
        const zeroAfterDiscard = discardReadsZero(options, device);
        for (let index = 0; index < window; index++) {
          const position = base + index;
          const got = actual[index]!;
          // A byte no request covers keeps its value; a covered byte holds what one of the
          // requests covering it left there.
          const covering = candidates.filter(
            (candidate) => position >= candidate.from && position < candidate.to,
          );
          const explained =
            covering.length === 0
              ? got === prior[index]
              : covering.some((candidate) => {
                  if (candidate.bytes !== undefined)
                    return got === candidate.bytes[position - candidate.from];
                  if (got === 0) return true;
                  return (
                    candidate.discard &&
                    !zeroAfterDiscard &&
                    (got === prior[index] || got === initial?.[position])
                  );
                });
          if (!explained) {
            throw new Error(
              `overlapping requests left byte ${got} at ${position}: ${
                covering.length === 0
                  ? `no request covers it, it held ${prior[index]}`
                  : 'none of them wrote that'
              }`,
            );
          }
        }
        // The device must still work normally afterwards.
        const data = patternBytes(77, window);
        await device.write(base, data);
        model.write(base, data);
        await verify(device, model, base, window, 'write after overlapping requests');
      } finally {
        await device.close();
      }
    },
  );
}

/** Bounds: requests outside the device reject with the right code and change nothing. */
export async function checkBounds(device: BlockDevice): Promise<void> {
  const size = device.size;
  const one = new Uint8Array([0x5a]);
  const two = new Uint8Array([0x5a, 0x5b]);
  await expectRejection(device.read(size, 1), ['EINVAL'], 'read of 1 byte at the end');
  await expectRejection(device.read(size + 1, 0), ['EINVAL'], 'read of 0 bytes past the end');
  await expectRejection(device.read(-1, 1), ['EINVAL'], 'read at offset -1');
  await expectRejection(device.read(0.5, 0), ['EINVAL'], 'read at offset 0.5');
  await expectRejection(device.read(0, 0.5), ['EINVAL'], 'read of length 0.5');
  await expectRejection(device.read(0, -1), ['EINVAL'], 'read of length -1');
  await expectRejection(device.read(Number.NaN, 0), ['EINVAL'], 'read at offset NaN');
  await expectRejection(device.readInto(new Uint8Array(1), size), ['EINVAL'], 'readInto at the end');
  await expectRejection(device.write(size, one), ['ENOSPC'], 'write of 1 byte at the end');
  await expectRejection(device.write(-1, one), ['EINVAL'], 'write at offset -1');
  await expectRejection(device.write(1.5, one), ['EINVAL'], 'write at offset 1.5');
  await expectRejection(device.writeZeroes(size, 1), ['ENOSPC'], 'writeZeroes of 1 byte at the end');
  await expectRejection(device.writeZeroes(0, -1), ['EINVAL'], 'writeZeroes of length -1');
  await expectRejection(device.discard(size, 1), ['EINVAL'], 'discard of 1 byte at the end');
  await expectRejection(device.discard(-1, 1), ['EINVAL'], 'discard at offset -1');
  await expectRejection(device.blockStatus(size, 1), ['EINVAL'], 'blockStatus of 1 byte at the end');
  await expectRejection(device.blockStatus(0, 0.5), ['EINVAL'], 'blockStatus of length 0.5');
  if (size > 0) {
    const before = await device.read(size - 1, 1);
    await expectRejection(device.read(size - 1, 2), ['EINVAL'], 'read crossing the end');
    await expectRejection(device.write(size - 1, two), ['ENOSPC'], 'write crossing the end');
    await expectRejection(device.writeZeroes(size - 1, 2), ['ENOSPC'], 'writeZeroes crossing the end');
    const after = await device.read(size - 1, 1);
    if (after[0] !== before[0]) throw new Error('a rejected write crossing the end changed the last byte');
  }
  // Zero-length requests at the end are fine.
  const empty = await device.read(size, 0);
  if (empty.length !== 0) throw new Error(`read of 0 bytes returned ${empty.length} bytes`);
  await device.readInto(new Uint8Array(0), size);
  await device.write(size, new Uint8Array(0));
  await device.writeZeroes(size, 0);
  await device.discard(size, 0);
}

/** A request given an already-aborted signal rejects and changes nothing. */
export async function checkAbortedSignal(device: BlockDevice): Promise<void> {
  const signal = AbortSignal.abort();
  const before = await device.read(0, Math.min(1, device.size));
  const attempts: [string, () => Promise<unknown>][] = [
    ['read', () => device.read(0, Math.min(1, device.size), { signal })],
    ['write', () => device.write(0, new Uint8Array(Math.min(1, device.size)).fill(0x77), { signal })],
    ['writeZeroes', () => device.writeZeroes(0, Math.min(1, device.size), { signal })],
    ['flush', () => device.flush({ signal })],
    ['blockStatus', () => device.blockStatus(0, Math.min(1, device.size), { signal })],
  ];
  for (const [what, attempt] of attempts) {
    let rejected = false;
    try {
      await attempt();
    } catch {
      rejected = true;
    }
    if (!rejected) throw new Error(`${what} with an aborted signal: expected a rejection, but it succeeded`);
  }
  const after = await device.read(0, Math.min(1, device.size));
  if (after[0] !== before[0]) {
    throw new Error('write with an aborted signal changed the device');
  }
}

/** Read-only devices: every change rejects with `EROFS` and the content stays. */
export async function checkReadOnly(device: BlockDevice, content: Uint8Array): Promise<void> {
  if (!device.readOnly) throw new Error('createReadOnly returned a device whose readOnly is false');
  const model = new DeviceModel(device.size, content);
  await verify(device, model, 0, device.size, 'read-only content');
  await expectRejection(device.write(0, new Uint8Array([1])), ['EROFS'], 'write on a read-only device');
  await expectRejection(device.writeZeroes(0, 1), ['EROFS'], 'writeZeroes on a read-only device');
  await expectRejection(device.discard(0, 1), ['EROFS'], 'discard on a read-only device');
  const resizeCodes = device.capabilities.resize ? ['EROFS'] : ['EROFS', 'ENOTSUP'];
  await expectRejection(device.resize(device.size + 512), resizeCodes, 'resize of a read-only device');
  await device.flush();
  await checkBlockStatus(device, model, 0, device.size, 'read-only blockStatus');
  await verify(device, model, 0, device.size, 'read-only content after rejected writes');
}

/** After close (or asyncDispose) every request rejects with `ECLOSED`; closing twice is fine;
 * close waits for requests in flight. */
export async function checkClose(options: ConformanceOptions, size: number): Promise<void> {
  const device = await options.create(size);
  const data = patternBytes(3, Math.min(device.size, 1000));
  const inFlight = device.write(0, data);
  await device.close();
  await inFlight;
  await device.close();
  const closed = ['ECLOSED'];
  await expectRejection(device.read(0, 0), closed, 'read after close');
  await expectRejection(device.readInto(new Uint8Array(0), 0), closed, 'readInto after close');
  await expectRejection(device.write(0, new Uint8Array(0)), closed, 'write after close');
  await expectRejection(device.writeZeroes(0, 0), closed, 'writeZeroes after close');
  await expectRejection(device.discard(0, 0), closed, 'discard after close');
  await expectRejection(device.flush(), closed, 'flush after close');
  await expectRejection(device.blockStatus(0, 1), closed, 'blockStatus after close');
  await expectRejection(device.resize(device.size), closed, 'resize after close');

  const disposable = await options.create(size);
  await disposable[Symbol.asyncDispose]();
  await expectRejection(disposable.read(0, 0), closed, 'read after Symbol.asyncDispose');
  await disposable.close();
}

/** Grow then shrink then grow: new bytes read as zeros, bytes past the end are gone. */
export async function checkResize(options: ConformanceOptions, size: number): Promise<void> {
  const device = await options.create(size);
  try {
    if (!device.capabilities.resize)
      throw new Error('supportsResize is set but capabilities.resize is false');
    const initial = device.size;
    const model = new DeviceModel(initial);
    const data = patternBytes(5, initial);
    await device.write(0, data);
    model.write(0, data);
    const grown = initial * 3 + 1000;
    await device.resize(grown);
    model.resize(grown);
    if (device.size !== grown) throw new Error(`size is ${device.size} after growing to ${grown}`);
    await verify(device, model, 0, grown, 'after growing');
    const shrunk = Math.floor(initial / 2);
    await device.resize(shrunk);
    model.resize(shrunk);
    if (device.size !== shrunk) throw new Error(`size is ${device.size} after shrinking to ${shrunk}`);
    await expectRejection(device.read(shrunk, 1), ['EINVAL'], 'read past the end after shrinking');
    await device.resize(initial);
    model.resize(initial);
    await verify(device, model, 0, initial, 'after shrinking and growing back');
    await checkBlockStatus(device, model, 0, initial, 'blockStatus after resizing');
  } finally {
    await device.close();
  }
}

function checkCapabilities(device: BlockDevice, expect: { readOnly: boolean } = { readOnly: false }): void {
  const c = device.capabilities;
  const powerOfTwo = (value: number) =>
    Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0;
  if (!powerOfTwo(c.minimumAlignment))
    throw new Error(`minimumAlignment ${c.minimumAlignment} is not a power of 2`);
  if (!powerOfTwo(c.preferredAlignment) || c.preferredAlignment < c.minimumAlignment) {
    throw new Error(`preferredAlignment ${c.preferredAlignment} is not a power of 2 >= minimumAlignment`);
  }
  if (!Number.isSafeInteger(c.maximumTransfer) || c.maximumTransfer <= 0) {
    throw new Error(`maximumTransfer ${c.maximumTransfer} is not a positive integer`);
  }
  if (typeof device.description !== 'string' || device.description.length === 0) {
    throw new Error('description is empty');
  }
  if (device.readOnly !== expect.readOnly) {
    throw new Error(
      expect.readOnly
        ? 'createReadOnly() returned a writable device'
        : 'create() returned a read-only device',
    );
  }
}

/** What the read-only kit needs: a way to make a read-only device holding given bytes. */
export interface ReadOnlyConformanceOptions {
  /** Shown in the test names. */
  readonly name: string;
  /** A read-only device whose `size` is `content.length` and whose bytes are `content`. */
  createReadOnly(content: Uint8Array): Promise<BlockDevice>;
  /** Device sizes to test (default: 1 B, 4097 B and about 193 KiB; the content is held in memory). */
  readonly sizes?: readonly number[];
  /** fast-check runs per property (default 40; `QCOWKIT_CONFORMANCE_RUNS` raises it). */
  readonly numRuns?: number;
  /** Longest random operation sequence (default 30). */
  readonly maxOperations?: number;
  /** Per-test timeout in milliseconds (default: vitest's). */
  readonly timeout?: number;
  /** fast-check seed, to replay a failure (default: random; also `QCOWKIT_CONFORMANCE_SEED`). */
  readonly seed?: number;
}

const DEFAULT_READ_ONLY_SIZES = [1, 4097, 197_635];

/** The content a read-only device of `size` bytes is made with in the kit: data with, for one
 * seed in four, a run of zeros in the middle (so zero detection is exercised). */
function readOnlyContent(seed: number, size: number): Uint8Array {
  return patternBytes(seed, size);
}

/** Random read-only operation sequences (reads into new and given buffers, block status, flush). */
export function readOnlyOperationsArbitrary(
  size: number,
  maxOperations = DEFAULT_MAX_OPERATIONS,
): fc.Arbitrary<ConformanceOperation[]> {
  const range = rangeArbitrary(size);
  return fc.array(
    fc.oneof(
      {
        weight: 4,
        arbitrary: fc
          .tuple(range, fc.boolean())
          .map(([r, into]): ConformanceOperation => ({ kind: 'read', ...r, into })),
      },
      { weight: 2, arbitrary: range.map((r): ConformanceOperation => ({ kind: 'blockStatus', ...r })) },
      { weight: 1, arbitrary: fc.constant<ConformanceOperation>({ kind: 'flush' }) },
    ),
    { minLength: 1, maxLength: maxOperations },
  );
}

/** Runs read-only `operations` on a device made from `content` and checks every answer. */
export async function runReadOnlySequence(
  options: ReadOnlyConformanceOptions,
  content: Uint8Array,
  operations: readonly ConformanceOperation[],
): Promise<void> {
  const device = await options.createReadOnly(content);
  try {
    if (device.size !== content.length) {
      throw new Error(`createReadOnly made a device of ${device.size} bytes for ${content.length} bytes`);
    }
    const run = new ModelRun(device, {
      name: options.name,
      create: () => Promise.reject(new Error('a read-only run makes no writable device')),
      initialContent: () => content,
    });
    for (const [index, operation] of operations.entries()) {
      if (operation.kind !== 'read' && operation.kind !== 'blockStatus' && operation.kind !== 'flush') {
        throw new Error(
          `runReadOnlySequence: step ${index} is a ${operation.kind}, which changes the device`,
        );
      }
      await run.step(operation, index);
    }
  } finally {
    await device.close();
  }
}

/** Bounds of a read-only device: reads and block status outside it reject with `EINVAL`, changes
 * anywhere reject (`EROFS`, or the out-of-range code), and zero-length reads at the end succeed. */
export async function checkReadOnlyBounds(device: BlockDevice): Promise<void> {
  const size = device.size;
  const refused = ['EROFS', 'EINVAL', 'ENOSPC'];
  await expectRejection(device.read(size, 1), ['EINVAL'], 'read of 1 byte at the end');
  await expectRejection(device.read(size + 1, 0), ['EINVAL'], 'read of 0 bytes past the end');
  await expectRejection(device.read(-1, 1), ['EINVAL'], 'read at offset -1');
  await expectRejection(device.read(0.5, 0), ['EINVAL'], 'read at offset 0.5');
  await expectRejection(device.read(0, -1), ['EINVAL'], 'read of length -1');
  await expectRejection(device.read(Number.NaN, 0), ['EINVAL'], 'read at offset NaN');
  await expectRejection(device.readInto(new Uint8Array(1), size), ['EINVAL'], 'readInto at the end');
  await expectRejection(device.blockStatus(size, 1), ['EINVAL'], 'blockStatus of 1 byte at the end');
  await expectRejection(device.blockStatus(0, 0.5), ['EINVAL'], 'blockStatus of length 0.5');
  if (size > 0) await expectRejection(device.read(size - 1, 2), ['EINVAL'], 'read crossing the end');
  await expectRejection(device.write(size, new Uint8Array(1)), refused, 'write at the end');
  await expectRejection(device.write(-1, new Uint8Array(1)), refused, 'write at offset -1');
  await expectRejection(device.writeZeroes(size, 1), refused, 'writeZeroes at the end');
  await expectRejection(device.discard(-1, 1), refused, 'discard at offset -1');
  const empty = await device.read(size, 0);
  if (empty.length !== 0) throw new Error(`read of 0 bytes returned ${empty.length} bytes`);
  await device.readInto(new Uint8Array(0), size);
}

/** Several reads and block-status requests at once, over random ranges (overlapping or not):
 * each answers as if alone. */
export function readOnlyConcurrencyProperty(options: ReadOnlyConformanceOptions, size: number) {
  const request = fc.record({
    range: rangeArbitrary(size),
    kind: fc.constantFrom<'read' | 'blockStatus'>('read', 'read', 'blockStatus'),
  });
  return fc.asyncProperty(
    fc.nat(),
    fc.array(request, { minLength: 1, maxLength: 8 }),
    async (seed, requests) => {
      const content = readOnlyContent(seed, size);
      const model = new DeviceModel(size, content);
      const device = await options.createReadOnly(content);
      try {
        await Promise.all(
          requests.map(async ({ range, kind }) => {
            const context = `concurrent ${kind} of ${range.length} bytes at ${range.offset}`;
            if (kind === 'blockStatus') {
              if (range.length > 0)
                await checkBlockStatus(device, model, range.offset, range.length, context);
              return;
            }
            compare(model, range.offset, await device.read(range.offset, range.length), context);
          }),
        );
      } finally {
        await device.close();
      }
    },
  );
}

/** After close every request rejects with `ECLOSED`; a read in flight at close still completes. */
export async function checkReadOnlyClose(options: ReadOnlyConformanceOptions, size: number): Promise<void> {
  const content = readOnlyContent(2, size);
  const device = await options.createReadOnly(content);
  const inFlight = device.read(0, size);
  await device.close();
  compare(new DeviceModel(size, content), 0, await inFlight, 'read in flight at close');
  await device.close();
  const closed = ['ECLOSED'];
  await expectRejection(device.read(0, 0), closed, 'read after close');
  await expectRejection(device.readInto(new Uint8Array(0), 0), closed, 'readInto after close');
  await expectRejection(device.flush(), closed, 'flush after close');
  await expectRejection(device.blockStatus(0, Math.min(1, size)), closed, 'blockStatus after close');
  const disposable = await options.createReadOnly(content);
  await disposable[Symbol.asyncDispose]();
  await expectRejection(disposable.read(0, 0), closed, 'read after Symbol.asyncDispose');
}

/** Registers a vitest `describe` block that runs the read-only part of the kit on a device that
 * cannot be written at all (for devices that can, use {@link describeBlockDeviceConformance} with
 * `createReadOnly`): reads and block status against the content over random sequences and
 * concurrent requests, bounds, refused changes, close and aborted signals. */
export function describeReadOnlyBlockDeviceConformance(options: ReadOnlyConformanceOptions): void {
  const sizes = options.sizes ?? DEFAULT_READ_ONLY_SIZES;
  const numRuns = runsFor(options);
  const seed = seedFor(options);
  const parameters = seed === undefined ? { numRuns } : { numRuns, seed };
  const timeout = options.timeout;
  const firstSize = sizes[0] ?? 4096;
  describe(`BlockDevice read-only conformance: ${options.name}`, () => {
    it(
      'reports sane capabilities',
      async () => {
        const device = await options.createReadOnly(readOnlyContent(1, firstSize));
        try {
          checkCapabilities(device, { readOnly: true });
        } finally {
          await device.close();
        }
      },
      timeout,
    );
    for (const size of sizes) {
      describe(`size ${size}`, () => {
        it(
          'reads the content over random operation sequences',
          async () => {
            await fc.assert(
              fc.asyncProperty(
                fc.nat(),
                readOnlyOperationsArbitrary(size, options.maxOperations),
                (s, operations) => runReadOnlySequence(options, readOnlyContent(s, size), operations),
              ),
              parameters,
            );
          },
          timeout,
        );
        it(
          'serves concurrent requests',
          async () => {
            await fc.assert(readOnlyConcurrencyProperty(options, size), {
              ...parameters,
              numRuns: Math.max(1, Math.ceil(numRuns / 2)),
            });
          },
          timeout,
        );
        it(
          'rejects out-of-range requests and every change',
          async () => {
            const content = readOnlyContent(3, size);
            const device = await options.createReadOnly(content);
            try {
              await checkReadOnlyBounds(device);
              await checkReadOnly(device, content);
            } finally {
              await device.close();
            }
          },
          timeout,
        );
      });
    }
    it('rejects requests after close with ECLOSED', () => checkReadOnlyClose(options, firstSize), timeout);
    it(
      'rejects requests whose signal is already aborted',
      async () => {
        const device = await options.createReadOnly(readOnlyContent(4, firstSize));
        try {
          const signal = AbortSignal.abort();
          const length = Math.min(1, device.size);
          for (const [what, attempt] of [
            ['read', () => device.read(0, length, { signal })],
            ['blockStatus', () => device.blockStatus(0, length, { signal })],
            ['flush', () => device.flush({ signal })],
          ] as const) {
            let rejected = false;
            try {
              await attempt();
            } catch {
              rejected = true;
            }
            if (!rejected)
              throw new Error(`${what} with an aborted signal: expected a rejection, but it succeeded`);
          }
        } finally {
          await device.close();
        }
      },
      timeout,
    );
  });
}

/**
 * Registers a vitest `describe` block that runs the whole conformance kit on a device.
 */
export function describeBlockDeviceConformance(options: ConformanceOptions): void {
  const sizes = options.sizes ?? DEFAULT_SIZES;
  const numRuns = runsFor(options);
  const seed = seedFor(options);
  const parameters = seed === undefined ? { numRuns } : { numRuns, seed };
  const timeout = options.timeout;
  describe(`BlockDevice conformance: ${options.name}`, () => {
    it(
      'reports sane capabilities',
      async () => {
        const device = await options.create(sizes[0] ?? 4096);
        try {
          checkCapabilities(device);
        } finally {
          await device.close();
        }
      },
      timeout,
    );
    for (const size of sizes) {
      describe(`size ${size}`, () => {
        it(
          'matches an in-memory model over random operation sequences',
          async () => {
            await fc.assert(modelProperty(options, size), parameters);
          },
          timeout,
        );
        it(
          'serves concurrent non-overlapping requests',
          async () => {
            await fc.assert(concurrencyProperty(options, size), {
              ...parameters,
              numRuns: Math.max(1, Math.ceil(numRuns / 2)),
            });
          },
          timeout,
        );
        it(
          'leaves each byte as one of several overlapping requests left it',
          async () => {
            await fc.assert(overlapProperty(options, size), {
              ...parameters,
              numRuns: Math.max(1, Math.ceil(numRuns / 2)),
            });
          },
          timeout,
        );
        it(
          'rejects out-of-range requests with EINVAL or ENOSPC',
          async () => {
            const device = await options.create(size);
            try {
              await checkBounds(device);
            } finally {
              await device.close();
            }
          },
          timeout,
        );
      });
    }
    it('rejects requests after close with ECLOSED', () => checkClose(options, sizes[0] ?? 4096), timeout);
    it(
      'rejects requests whose signal is already aborted',
      async () => {
        const device = await options.create(sizes[0] ?? 4096);
        try {
          await checkAbortedSignal(device);
        } finally {
          await device.close();
        }
      },
      timeout,
    );
    const createReadOnly = options.createReadOnly;
    if (createReadOnly !== undefined) {
      it(
        'rejects changes to a read-only device with EROFS',
        async () => {
          const content = patternBytes(11, 70_003);
          const device = await createReadOnly(content);
          try {
            await checkReadOnly(device, content);
          } finally {
            await device.close();
          }
        },
        timeout,
      );
    }
    if (options.supportsResize) {
      it('resizes', () => checkResize(options, 70_003), timeout);
    } else {
      it(
        'rejects resize with ENOTSUP when it cannot resize',
        async () => {
          const device = await options.create(sizes[0] ?? 4096);
          try {
            if (device.capabilities.resize) {
              throw new Error('capabilities.resize is true: set supportsResize so the kit tests resizing');
            }
            await expectRejection(device.resize(device.size + 512), ['ENOTSUP'], 'resize');
          } finally {
            await device.close();
          }
        },
        timeout,
      );
    }
  });
}
