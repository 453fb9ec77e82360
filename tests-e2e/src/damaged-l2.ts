/**
 * A generator of qcow2 images whose L1 or L2 entries name host offsets that are not cluster
 * aligned, the damage a fuzzer of `check -r` found us repairing less than qemu-img. Each image is
 * made by qemu-img and qemu-io at test time, then patched by hand:
 *
 * - a data cluster entry moved off its cluster (COPIED kept, and COPIED dropped);
 * - preallocated ("all zeroes" with a host offset) entries moved off their cluster, one of them
 *   far past the end of the file, on a v3 image; the same kind of entry on a compat=0.10 (v2)
 *   image, which has no zero flag; the same with extended L2 entries;
 * - both kinds in a snapshot's own L2 table, and a preallocated one in a table the snapshot
 *   shares with the active L1 table;
 * - an L1 entry naming its L2 table 512 bytes into its cluster (the "table" QEMU then reads runs
 *   into the guest data cluster after it);
 * - a fuzzer-like mutant: bytes of the active L2 table scribbled by a seeded generator.
 *
 * `undefinedRanges` are the guest ranges QEMU cannot read after its own repair (it fails with an
 * I/O error there): data can be compared only outside them.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface DamagedL2Image {
  /** What the damage is. */
  readonly about: string;
  /** Guest ranges `[offset, length]` QEMU cannot read after `qemu-img check -r all`. */
  readonly undefinedRanges: readonly (readonly [number, number])[];
}

export interface DamagedL2Case {
  readonly name: string;
  /** Guest size of the image. */
  readonly size: number;
  /** Builds the damaged image at `file` (a path inside `dir`) and says what it is. */
  readonly build: (dir: string, file: string) => DamagedL2Image;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
/** Bits 9-55 of a table entry. */
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const COPIED = 1n << 63n;
const ZERO = 1n;
/** How far the damage moves an offset into its cluster. */
const SKEW = 0x200n;

function tool(dir: string, command: string, args: readonly string[]): void {
  execFileSync(command, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Big-endian 64-bit words of a qcow2 file, patched in memory and saved at once. */
class Qcow2Bytes {
  readonly bytes: Buffer;
  constructor(readonly path: string) {
    this.bytes = readFileSync(path);
  }
  u64(at: number): bigint {
    return this.bytes.readBigUInt64BE(at);
  }
  set(at: number, value: bigint): void {
    this.bytes.writeBigUInt64BE(value, at);
  }
  get clusterSize(): number {
    return 2 ** this.bytes.readUInt32BE(20);
  }
  get l1Offset(): number {
    return Number(this.u64(40));
  }
  /** Host offset of the L2 table L1 entry `index` of the table at `l1Offset` names. */
  l2Table(index: number, l1Offset = this.l1Offset): number {
    return Number(this.u64(l1Offset + index * 8) & OFFSET_MASK);
  }
  /** The first snapshot's L1 table offset (snapshot table entries start with it). */
  get snapshotL1Offset(): number {
    return Number(this.u64(Number(this.u64(64))));
  }
  save(): void {
    writeFileSync(this.path, this.bytes);
  }
}

/**
 * A qcow2 image of 8 MiB with data in its first two L2 tables' ranges: 64 KiB of 0x11 at 0 (with
 * 8 KiB of allocated zeroes at 16 KiB, on v3), 64 KiB of 0x22 at 2 MiB.
 */
function baseImage(dir: string, file: string, options: readonly string[]): void {
  tool(dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', options.join(','), file, `${SIZE}`]);
  tool(dir, 'qemu-io', [
    ...['write -P 0x11 0 64k', 'write -z 16k 8k', 'write -P 0x22 2M 64k'].flatMap((c) => ['-c', c]),
    file,
  ]);
}

/** Moves the host offset of the entry at `at` off its cluster, its other bits as given. */
function skew(image: Qcow2Bytes, at: number, flags: { copied: boolean; zero: boolean }): void {
  const offset = image.u64(at) & OFFSET_MASK;
  image.set(at, offset + SKEW + (flags.copied ? COPIED : 0n) + (flags.zero ? ZERO : 0n));
}

/** A small deterministic generator (xorshift32), for the fuzzer-like mutant. */
function xorshift(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state;
  };
}

const CLUSTER_4K = 'cluster_size=4096';

export const DAMAGED_L2_CASES: readonly DamagedL2Case[] = [
  {
    name: 'misaligned data cluster (v3)',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0);
      // Each names its own cluster and the start of the next: entry 1 keeps COPIED (its cluster's
      // refcount stays 1), entry 3 lost it (QEMU sets it again from that refcount).
      skew(image, l2 + 1 * 8, { copied: true, zero: false });
      skew(image, l2 + 3 * 8, { copied: false, zero: false });
      image.save();
      return {
        about: 'two normal L2 entries 512 bytes into their clusters, one without COPIED',
        undefinedRanges: [
          [4 * KiB, 4 * KiB],
          [12 * KiB, 4 * KiB],
        ],
      };
    },
  },
  {
    name: 'misaligned preallocated entries (v3)',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0);
      // Entry 4 is allocated zeroes (write -z): moved. Entry 6 holds data: made allocated zeroes,
      // moved. Entry 7: allocated zeroes far past the end of the file, moved.
      skew(image, l2 + 4 * 8, { copied: true, zero: true });
      skew(image, l2 + 6 * 8, { copied: true, zero: true });
      image.set(l2 + 7 * 8, COPIED | (1n << 40n) | SKEW | ZERO);
      image.save();
      return { about: 'allocated-zero entries off their clusters, one past the end', undefinedRanges: [] };
    },
  },
  {
    name: 'misaligned preallocated entries (compat=0.10)',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K, 'compat=0.10']);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0);
      skew(image, l2 + 1 * 8, { copied: true, zero: true });
      skew(image, l2 + 2 * 8, { copied: true, zero: true });
      image.save();
      // QEMU repairs them with the zero flag, which a v2 image cannot have: it fails to read them.
      return {
        about: 'v2 entries with the zero flag and an offset off its cluster',
        undefinedRanges: [[4 * KiB, 8 * KiB]],
      };
    },
  },
  {
    name: 'misaligned preallocated entry (extended L2)',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, ['extended_l2=on', 'cluster_size=65536']);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0);
      // The data cluster at guest 0 (16-byte entries): no allocated subcluster, 8 reading as zero.
      skew(image, l2, { copied: true, zero: false });
      image.set(l2 + 8, 0xffn << 32n);
      image.save();
      return {
        about: 'an extended entry without allocated subclusters, off its cluster',
        undefinedRanges: [],
      };
    },
  },
  {
    name: "misaligned entries in a snapshot's L2 table",
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      tool(dir, 'qemu-img', ['snapshot', '-c', 's1', file]);
      // The active table is copied on this write: the snapshot keeps the old one alone.
      tool(dir, 'qemu-io', ['-c', 'write -P 0x33 0 4k', file]);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0, image.snapshotL1Offset);
      skew(image, l2 + 4 * 8, { copied: false, zero: true });
      skew(image, l2 + 1 * 8, { copied: false, zero: false });
      image.save();
      return {
        about: 'a preallocated and a data entry off their clusters, snapshot only',
        undefinedRanges: [],
      };
    },
  },
  {
    name: 'misaligned preallocated entry in a table shared with a snapshot',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      tool(dir, 'qemu-img', ['snapshot', '-c', 's1', file]);
      const image = new Qcow2Bytes(join(dir, file));
      skew(image, image.l2Table(0) + 5 * 8, { copied: false, zero: true });
      image.save();
      return { about: 'one table, two L1 entries naming it', undefinedRanges: [] };
    },
  },
  {
    name: 'L1 entry naming a misaligned L2 table',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      tool(dir, 'qemu-io', ['-c', 'write -P 0x03 0 4k', file]);
      const image = new Qcow2Bytes(join(dir, file));
      // The "table" QEMU reads at the skewed offset ends in the first guest data cluster, whose
      // 0x03 bytes read as preallocated entries (with reserved bits) off their clusters, far past
      // the end of the file: QEMU repairs them there, in what was that data cluster.
      image.set(image.l1Offset, COPIED | (BigInt(image.l2Table(0)) + SKEW));
      image.save();
      return { about: 'L1[0] 512 bytes into its L2 table', undefinedRanges: [[0, 2 * MiB]] };
    },
  },
  {
    name: 'fuzzer-like mutant of an L2 table',
    size: SIZE,
    build: (dir, file) => {
      baseImage(dir, file, [CLUSTER_4K]);
      tool(dir, 'qemu-img', ['snapshot', '-c', 's1', file]);
      tool(dir, 'qemu-io', ['-c', 'write -P 0x44 32k 8k', file]);
      const image = new Qcow2Bytes(join(dir, file));
      const l2 = image.l2Table(0);
      const next = xorshift(8);
      // Scribble over the low bytes of the first 16 entries: zero flags, skewed offsets, reserved
      // bits and COPIED flags, as a byte-level fuzzer's mutations do.
      for (let k = 0; k < 12; k++) {
        const at = l2 + (next() % 16) * 8 + 6 + (next() % 2);
        image.bytes[at] = next() & 0xff;
      }
      image.save();
      return { about: 'random bytes in the low halves of 16 L2 entries', undefinedRanges: [[0, 64 * KiB]] };
    },
  },
];
