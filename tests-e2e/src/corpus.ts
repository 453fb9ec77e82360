/**
 * The read corpus of issue 3: images made at test time by qemu-img and qemu-io, covering every
 * layout our reader must handle. Each entry knows how to build itself in a folder; names are
 * paths relative to that folder (commands run with it as the working directory, so relative
 * backing and data-file names resolve as QEMU resolves them).
 *
 * Every writable image gets the same mix of guest writes: unaligned pattern writes, zero writes
 * (`write -z`) and discards, so each cluster type appears.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

export type CorpusFormat = 'qcow2' | 'qcow' | 'raw';

export interface CorpusImage {
  /** Path relative to the corpus folder. */
  readonly file: string;
  readonly format: CorpusFormat;
  /** What this image covers. */
  readonly about: string;
  /** A snapshot to convert from as well (`-l snapshot.name=...`). */
  readonly snapshot?: string;
  /** The virtual size is huge (terabytes): compare sparse-aware only. */
  readonly huge?: boolean;
  /** The image has a backing file (worth an `info --backing-chain`). */
  readonly backed?: boolean;
  /** Builds the image (and whatever it depends on) in `dir`. */
  readonly build: (dir: string) => void;
}

const MiB = 2 ** 20;

function tool(dir: string, command: string, args: readonly string[]): void {
  execFileSync(command, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

function qemuImg(dir: string, ...args: string[]): void {
  tool(dir, 'qemu-img', args);
}

/** Runs qemu-io commands on `file` (opened as `format`). */
function qemuIo(dir: string, file: string, format: CorpusFormat, commands: readonly string[]): void {
  tool(dir, 'qemu-io', ['-f', format, ...commands.flatMap((command) => ['-c', command]), file]);
}

/** The standard mix of writes: unaligned patterns, zero writes and a discard, within `size`. */
function standardWrites(size: number, seed = 1): string[] {
  const at = (fraction: number) => Math.floor(size * fraction);
  return [
    `write -P 0x${(0x10 + seed).toString(16)} 1000 70000`,
    `write -P 0x${(0x20 + seed).toString(16)} ${at(0.3) + 511} 131072`,
    `write -P 0x${(0x30 + seed).toString(16)} ${size - 5000} 5000`,
    `write -z ${at(0.3) + 4096} 65536`,
    `write -P 0x${(0x40 + seed).toString(16)} ${at(0.6)} 200000`,
    `discard ${at(0.6)} 131072`,
    `write -z ${at(0.8)} 8192`,
  ];
}

function qcow2With(file: string, options: string, size = 4 * MiB, about = options): CorpusImage {
  return {
    file,
    format: 'qcow2',
    about,
    build: (dir) => {
      qemuImg(
        dir,
        'create',
        '-q',
        '-f',
        'qcow2',
        ...(options === '' ? [] : ['-o', options]),
        file,
        String(size),
      );
      qemuIo(dir, file, 'qcow2', standardWrites(size));
    },
  };
}

/** A raw file of `size` holding text and pseudo-random data (for compressed images). */
function mixedRaw(dir: string, file: string, size: number): void {
  qemuImg(dir, 'create', '-q', '-f', 'raw', file, String(size));
  qemuIo(dir, file, 'raw', [
    `write -P 0x61 0 ${size / 4}`,
    `write -P 0x00 ${size / 4} 65536`,
    `write -s /proc/self/exe ${size / 2} 65536`,
    `write -P 0x7a ${(3 * size) / 4} 100000`,
  ]);
}

function compressed(file: string, type: 'zlib' | 'zstd', rewrite: boolean): CorpusImage {
  const size = 4 * MiB;
  return {
    file,
    format: 'qcow2',
    about: `${type} compressed${rewrite ? ', partly rewritten' : ''}`,
    build: (dir) => {
      const source = `${file}.src.raw`;
      mixedRaw(dir, source, size);
      qemuImg(
        dir,
        'convert',
        '-q',
        '-c',
        '-f',
        'raw',
        '-O',
        'qcow2',
        '-o',
        `compression_type=${type}`,
        source,
        file,
      );
      if (rewrite) qemuIo(dir, file, 'qcow2', standardWrites(size, 2));
    },
  };
}

const size8T = 8 * 2 ** 40;

/** Every corpus image, in build order (an image may depend on an earlier one's files). */
export const CORPUS: readonly CorpusImage[] = [
  qcow2With('cluster-512.qcow2', 'cluster_size=512', 2 * MiB),
  qcow2With('cluster-4k.qcow2', 'cluster_size=4096'),
  qcow2With('cluster-64k.qcow2', 'cluster_size=65536'),
  qcow2With('cluster-2m.qcow2', 'cluster_size=2097152', 8 * MiB),
  qcow2With('refcount-1.qcow2', 'refcount_bits=1'),
  qcow2With('refcount-2.qcow2', 'refcount_bits=2'),
  qcow2With('refcount-8.qcow2', 'refcount_bits=8'),
  qcow2With('refcount-16.qcow2', 'refcount_bits=16'),
  qcow2With('refcount-64.qcow2', 'refcount_bits=64'),
  qcow2With('extl2-64k.qcow2', 'extended_l2=on,cluster_size=65536'),
  qcow2With('extl2-128k.qcow2', 'extended_l2=on,cluster_size=131072'),
  qcow2With('compat-0.10.qcow2', 'compat=0.10'),
  qcow2With('compat-1.1.qcow2', 'compat=1.1'),
  compressed('zlib.qcow2', 'zlib', false),
  compressed('zstd.qcow2', 'zstd', false),
  compressed('zlib-rewritten.qcow2', 'zlib', true),
  compressed('zstd-rewritten.qcow2', 'zstd', true),
  {
    file: 'chain/top.qcow2',
    format: 'qcow2',
    about: 'raw <- qcow2 <- qcow2 chain in a sub-folder',
    backed: true,
    build: (dir) => {
      mkdirSync(join(dir, 'chain'), { recursive: true });
      const size = 4 * MiB;
      qemuImg(dir, 'create', '-q', '-f', 'raw', 'chain/base.raw', String(size));
      qemuIo(dir, 'chain/base.raw', 'raw', standardWrites(size, 3));
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'chain/mid.qcow2');
      qemuIo(dir, 'chain/mid.qcow2', 'qcow2', ['write -P 0x55 300000 400000', 'write -z 2000000 70000']);
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'chain/top.qcow2');
      qemuIo(dir, 'chain/top.qcow2', 'qcow2', ['write -P 0x66 350000 1000', 'discard 3145728 65536']);
    },
  },
  {
    file: 'short-backing.qcow2',
    format: 'qcow2',
    about: 'a backing file shorter than its overlay',
    backed: true,
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'raw', 'short-base.raw', String(MiB + 1000));
      qemuIo(dir, 'short-base.raw', 'raw', ['write -P 0x71 0 1049576']);
      qemuImg(
        dir,
        'create',
        '-q',
        '-f',
        'qcow2',
        '-b',
        'short-base.raw',
        '-F',
        'raw',
        'short-backing.qcow2',
        '4M',
      );
      qemuIo(dir, 'short-backing.qcow2', 'qcow2', [
        'write -P 0x72 1048000 3000',
        'write -P 0x73 3000000 5000',
      ]);
    },
  },
  {
    file: 'extl2-backing.qcow2',
    format: 'qcow2',
    about: 'extended L2 over a backing file (subclusters falling through)',
    backed: true,
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', 'extl2-base.qcow2', '4M');
      qemuIo(dir, 'extl2-base.qcow2', 'qcow2', ['write -P 0x81 0 4194304']);
      qemuImg(
        dir,
        'create',
        '-q',
        '-f',
        'qcow2',
        '-o',
        'extended_l2=on,cluster_size=65536',
        '-b',
        'extl2-base.qcow2',
        '-F',
        'qcow2',
        'extl2-backing.qcow2',
      );
      qemuIo(dir, 'extl2-backing.qcow2', 'qcow2', [
        'write -P 0x82 2048 2048',
        'write -z 70000 4096',
        'write -P 0x83 131072 10000',
        'discard 262144 65536',
      ]);
    },
  },
  {
    file: 'snapshots.qcow2',
    format: 'qcow2',
    about: 'internal snapshots',
    snapshot: 'first',
    build: (dir) => {
      const size = 4 * MiB;
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', 'snapshots.qcow2', String(size));
      qemuIo(dir, 'snapshots.qcow2', 'qcow2', standardWrites(size, 4));
      qemuImg(dir, 'snapshot', '-c', 'first', 'snapshots.qcow2');
      qemuIo(dir, 'snapshots.qcow2', 'qcow2', ['write -P 0x91 0 100000', 'write -z 2097152 65536']);
      qemuImg(dir, 'snapshot', '-c', 'second', 'snapshots.qcow2');
      qemuIo(dir, 'snapshots.qcow2', 'qcow2', ['discard 0 65536', 'write -P 0x92 3000000 1234']);
    },
  },
  {
    file: 'datafile-raw.qcow2',
    format: 'qcow2',
    about: 'external data file, data_file_raw=on',
    build: (dir) => {
      qemuImg(
        dir,
        'create',
        '-q',
        '-f',
        'qcow2',
        '-o',
        'data_file=datafile-raw.data,data_file_raw=on',
        'datafile-raw.qcow2',
        '4M',
      );
      qemuIo(dir, 'datafile-raw.qcow2', 'qcow2', standardWrites(4 * MiB, 5));
    },
  },
  {
    file: 'datafile.qcow2',
    format: 'qcow2',
    about: 'external data file, data_file_raw=off',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=datafile.data', 'datafile.qcow2', '4M');
      qemuIo(dir, 'datafile.qcow2', 'qcow2', standardWrites(4 * MiB, 6));
    },
  },
  {
    file: 'lazy-dirty.qcow2',
    format: 'qcow2',
    about: 'lazy refcounts left dirty by a crash',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'lazy-dirty.qcow2', '4M');
      // qemu-io aborts on purpose: the image stays dirty with stale refcounts.
      try {
        qemuIo(dir, 'lazy-dirty.qcow2', 'qcow2', [...standardWrites(4 * MiB, 7), 'abort']);
      } catch {
        // the abort is the point
      }
    },
  },
  {
    file: 'bitmaps.qcow2',
    format: 'qcow2',
    about: 'persistent dirty bitmaps (enabled, disabled, 128 KiB granularity)',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', 'bitmaps.qcow2', '4M');
      qemuImg(dir, 'bitmap', '--add', 'bitmaps.qcow2', 'nightly');
      qemuImg(dir, 'bitmap', '--add', '-g', '131072', 'bitmaps.qcow2', 'weekly');
      qemuImg(dir, 'bitmap', '--disable', 'bitmaps.qcow2', 'weekly');
      qemuIo(dir, 'bitmaps.qcow2', 'qcow2', standardWrites(4 * MiB, 10));
    },
  },
  {
    file: 'bitmap-in-use.qcow2',
    format: 'qcow2',
    about: 'a bitmap left in use by a crash',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', 'bitmap-in-use.qcow2', '4M');
      qemuImg(dir, 'bitmap', '--add', 'bitmap-in-use.qcow2', 'live');
      try {
        qemuIo(dir, 'bitmap-in-use.qcow2', 'qcow2', [...standardWrites(4 * MiB, 11), 'abort']);
      } catch {
        // the abort is the point
      }
    },
  },
  qcow2With('prealloc-metadata.qcow2', 'preallocation=metadata'),
  qcow2With('prealloc-falloc.qcow2', 'preallocation=falloc'),
  qcow2With('odd-size.qcow2', '', 1000001, 'a size of 1000001 bytes'),
  {
    file: 'huge-8t.qcow2',
    format: 'qcow2',
    about: 'an 8 TiB image with data at both ends',
    huge: true,
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow2', 'huge-8t.qcow2', String(size8T));
      qemuIo(dir, 'huge-8t.qcow2', 'qcow2', [
        'write -P 0xa1 1000 70000',
        `write -P 0xa2 ${size8T - 100000} 99000`,
        `write -z ${size8T - 65536 * 4} 65536`,
      ]);
    },
  },
  {
    file: 'v1.qcow',
    format: 'qcow',
    about: 'the qcow version 1 format',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow', 'v1.qcow', '4M');
      qemuIo(dir, 'v1.qcow', 'qcow', standardWrites(4 * MiB, 8));
    },
  },
  {
    file: 'v1-compressed.qcow',
    format: 'qcow',
    about: 'qcow version 1, compressed, partly rewritten',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'qcow', 'v1-compressed.qcow', '4M');
      // Compressed writes are whole clusters (4 KiB in qcow v1).
      qemuIo(dir, 'v1-compressed.qcow', 'qcow', [
        'write -c -P 0x5a 0 4096',
        'write -c -P 0x5b 8192 4096',
        'write -c -s /proc/self/exe 1048576 4096',
        'write -P 0x5c 6000 5000',
        'write -z 3000000 4096',
      ]);
    },
  },
  {
    file: 'v1-backing.qcow',
    format: 'qcow',
    about: 'qcow version 1 over a raw backing file',
    backed: true,
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'raw', 'v1-base.raw', '4M');
      qemuIo(dir, 'v1-base.raw', 'raw', standardWrites(4 * MiB, 12));
      qemuImg(dir, 'create', '-q', '-f', 'qcow', '-b', 'v1-base.raw', '-F', 'raw', 'v1-backing.qcow');
      qemuIo(dir, 'v1-backing.qcow', 'qcow', ['write -P 0x6d 300000 70000']);
    },
  },
  qcow2With('extl2-2m.qcow2', 'extended_l2=on,cluster_size=2097152', 8 * MiB),
  qcow2With('cluster-512-refcount-64.qcow2', 'cluster_size=512,refcount_bits=64', 2 * MiB),
  {
    file: 'plain.raw',
    format: 'raw',
    about: 'a raw file with holes',
    build: (dir) => {
      qemuImg(dir, 'create', '-q', '-f', 'raw', 'plain.raw', '4M');
      qemuIo(dir, 'plain.raw', 'raw', standardWrites(4 * MiB, 9));
    },
  },
];

/** Builds every corpus image in `dir` (which must exist). */
export function buildCorpus(dir: string, images: readonly CorpusImage[] = CORPUS): void {
  for (const image of images) image.build(dir);
  syncTree(dir);
}

/**
 * Flushes every file under `dir`. File systems with delayed allocation change a file's st_blocks
 * when its data is written back; QEMU's tools and ours both read st_blocks (info's actual-size,
 * and the metadata-preallocation test behind map's zero flags), so it must not move between the
 * two runs being compared.
 */
function syncTree(dir: string): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      syncTree(path);
    } else if (entry.isFile()) {
      const fd = openSync(path, 'r');
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    }
  }
}
