/**
 * QcowImage: the legacy qcow (version 1) format, read-only, as a BlockDevice. Normal and
 * compressed (raw deflate) clusters, backing files (the format has no backing-format field, so
 * the resolver always gets `format: undefined`). AES-encrypted images are refused.
 */
import { type BlockDevice, type BlockDeviceCapabilities, BlockDeviceError } from '@qcowkit/blockdev';
import { TableCache } from './cache/table-cache.js';
import { pureCodecs } from './codecs.js';
import { decodeL1Table } from './format/l1-entry.js';
import { decodeQcowV1Header, QCOW_V1_HEADER_LENGTH, type QcowV1Header } from './format/qcow-v1-header.js';
import { CompressedClusterReader } from './mapping/compressed-reader.js';
import { QcowV1Mapper } from './mapping/qcow-v1-mapper.js';
import type { SegmentSource } from './mapping/read-segments.js';
import type { Segment } from './mapping/segment.js';
import { type ImageOpenOptions, MAX_CHAIN_DEPTH } from './options.js';
import { ReadOnlyImage } from './read-only-image.js';

export class QcowImage extends ReadOnlyImage {
  readonly file: BlockDevice;
  readonly header: QcowV1Header;
  readonly version = 1 as const;
  readonly size: number;
  readonly clusterSize: number;
  readonly backingFileName: string | undefined;
  readonly backingFormat: undefined = undefined;
  readonly encrypted: boolean;
  readonly chainDepth: number;
  readonly description: string;
  readonly capabilities: BlockDeviceCapabilities;
  #backing: BlockDevice | undefined;
  #mapper!: QcowV1Mapper;
  #source!: SegmentSource;
  readonly #compressed: CompressedClusterReader;

  private constructor(file: BlockDevice, header: QcowV1Header, options: ImageOpenOptions) {
    super();
    this.file = file;
    this.header = header;
    this.size = header.size;
    this.clusterSize = 2 ** header.clusterBits;
    this.backingFileName = header.backingFileName;
    this.encrypted = header.cryptMethod !== 0;
    this.chainDepth = options.chainDepth ?? 0;
    this.description = options.description ?? `qcow:${file.description}`;
    this.capabilities = {
      discard: false,
      writeZeroes: false,
      fastZero: false,
      blockStatus: true,
      flush: false,
      fua: false,
      resize: false,
      minimumAlignment: 1,
      preferredAlignment: this.clusterSize,
      maximumTransfer: 32 * 1024 * 1024,
    };
    this.#compressed = new CompressedClusterReader({
      file: this.file,
      codecs: options.codecs ?? pureCodecs,
      clusterSize: this.clusterSize,
      algorithm: 'deflate',
      label: 'qcow compressed cluster',
      cachedClusters: 4,
    });
  }

  static async open(file: BlockDevice, options: ImageOpenOptions = {}): Promise<QcowImage> {
    if (options.readOnly === false) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow: ${file.description}: the qcow format is read-only here`,
      );
    }
    if ((options.chainDepth ?? 0) >= MAX_CHAIN_DEPTH) {
      throw new BlockDeviceError(
        'EINVAL',
        `qcow: ${file.description}: backing chain longer than ${MAX_CHAIN_DEPTH} layers`,
      );
    }
    if (file.size < QCOW_V1_HEADER_LENGTH) {
      throw new BlockDeviceError('ECORRUPT', `qcow header: file too short (${file.size} bytes)`, {
        offset: 0,
      });
    }
    const header = decodeQcowV1Header(await file.read(0, Math.min(file.size, QCOW_V1_HEADER_LENGTH + 1024)));
    if (header.cryptMethod !== 0) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow: ${file.description}: encrypted images are not supported`,
      );
    }
    if (header.l1Size > 0 && header.l1TableOffset + header.l1Size * 8 > file.size) {
      throw new BlockDeviceError('ECORRUPT', 'qcow header: L1 table lies past the end of the file', {
        offset: 40,
      });
    }
    const image = new QcowImage(file, header, options);
    const l1 = decodeL1Table(
      header.l1Size > 0 ? await file.read(header.l1TableOffset, header.l1Size * 8) : new Uint8Array(0),
      header.l1Size,
    );
    const l2Bytes = 2 ** header.l2Bits * 8;
    const cacheBytes = options.l2CacheBytes ?? Math.min(32 * 1024 * 1024, header.l1Size * l2Bytes);
    image.#mapper = new QcowV1Mapper({
      readMetadata: (hostOffset, length) => file.read(hostOffset, length),
      fileSize: file.size,
      l1High: l1.high,
      l1Low: l1.low,
      clusterBits: header.clusterBits,
      l2Bits: header.l2Bits,
      cache: new TableCache<DataView>(Math.max(cacheBytes, 2 * l2Bytes)),
    });
    const name = header.backingFileName;
    if (name !== undefined && name !== '' && options.openBacking !== false) {
      if (options.allowExternalFiles === false) {
        throw new BlockDeviceError(
          'EUNSUPPORTED',
          `qcow: ${file.description}: the image's format was probed, not declared, and it names a backing file ('${name}'); declare the backing format to allow it`,
        );
      }
      if (options.resolveBacking === undefined) {
        throw new BlockDeviceError(
          'EUNSUPPORTED',
          `qcow: ${file.description}: no backing resolver for '${name}'`,
        );
      }
      image.#backing = await options.resolveBacking({
        name,
        format: undefined,
        depth: image.chainDepth + 1,
        from: image,
      });
    }
    image.#source = {
      dataDevice: file,
      backing: image.#backing,
      readCompressed: (descriptor, compressedBytes, into) =>
        image.#compressed.read(descriptor, compressedBytes, into),
      clusterSize: image.clusterSize,
      compressedDevice: file,
      concurrency: options.concurrency ?? 8,
    };
    return image;
  }

  get backing(): BlockDevice | undefined {
    return this.#backing;
  }

  protected mapRange(guestOffset: number, length: number, maxEntries?: number): Promise<Segment[]> {
    return this.#mapper.map(guestOffset, length, maxEntries);
  }

  protected segmentSource(): SegmentSource {
    return this.#source;
  }

  protected ownedDevices(): (BlockDevice | undefined)[] {
    return [this.#backing, this.file];
  }
}
