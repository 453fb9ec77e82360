import { describe, expect, test } from 'vitest';
import type { CheckResult } from '../src/engine.js';
import { checkToJson, formatCheckHuman } from '../src/output/check.js';
import { formatInfoHuman, type ImageInfo, infoToJson } from '../src/output/info.js';
import { formatMapHumanHeader, formatMapHumanRow, formatMapJsonEntry } from '../src/output/map.js';
import { toQemuJson } from '../src/output/qemu-json.js';

const clean: CheckResult = {
  totalClusters: 32,
  allocatedClusters: 2,
  fragmentedClusters: 0,
  compressedClusters: 0,
  imageEndOffset: 589824,
  corruptions: 0,
  leaks: 0,
  checkErrors: 0,
  corruptionsFixed: 0,
  leaksFixed: 0,
  messages: [],
};

describe('check output', () => {
  test('a clean image reads as qemu-img check prints it', () => {
    expect(formatCheckHuman(clean)).toBe(
      'No errors were found on the image.\n2/32 = 6.25% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 589824\n',
    );
    expect(`${toQemuJson(checkToJson(clean, 'a.qcow2', 'qcow2'))}\n`).toBe(
      '{\n    "image-end-offset": 589824,\n    "total-clusters": 32,\n    "check-errors": 0,\n    "allocated-clusters": 2,\n    "filename": "a.qcow2",\n    "format": "qcow2"\n}\n',
    );
  });

  test('corruptions and leaks are both reported, zero counters left out of JSON', () => {
    const result = { ...clean, totalClusters: 64, allocatedClusters: 17, corruptions: 34, leaks: 2 };
    expect(formatCheckHuman(result)).toBe(
      '\n34 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n' +
        '\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n' +
        '17/64 = 26.56% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 589824\n',
    );
    const json = checkToJson(result, 'x', 'qcow2');
    expect(json.corruptions).toBe(34);
    expect(json['fragmented-clusters']).toBeUndefined();
  });
});

describe('map output', () => {
  test('JSON entries and the human table are laid out like qemu-img map', () => {
    const extent = {
      offset: 0,
      length: 131072,
      depth: 0,
      present: true,
      zero: false,
      data: true,
      hostOffset: 327680,
    };
    expect(formatMapJsonEntry(extent)).toBe(
      '{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}',
    );
    expect(
      formatMapJsonEntry({ ...extent, present: false, zero: true, data: false, hostOffset: undefined }),
    ).toBe('{ "start": 0, "length": 131072, "depth": 0, "present": false, "zero": true, "data": false}');
    expect(formatMapHumanHeader() + formatMapHumanRow(extent, 'a.qcow2')).toBe(
      'Offset          Length          Mapped to       File\n0               0x20000         0x50000         a.qcow2\n',
    );
  });
});

describe('info output', () => {
  const info: ImageInfo = {
    filename: 'a.qcow2',
    format: 'qcow2',
    virtualSize: 2097152,
    actualSize: 405504,
    clusterSize: 65536,
    dirty: false,
    encrypted: false,
    backingFilename: 'base.raw',
    fullBackingFilename: 'base.raw',
    backingFormat: 'raw',
    snapshots: [],
    qcow2: {
      version: 3,
      compressionType: 'zlib',
      lazyRefcounts: false,
      refcountBits: 16,
      corrupt: false,
      extendedL2: false,
      dataFile: undefined,
      dataFileRaw: false,
      bitmaps: undefined,
    },
  };

  test('the human form reads like qemu-img info', () => {
    expect(formatInfoHuman(info)).toBe(
      [
        'image: a.qcow2',
        'file format: qcow2',
        'virtual size: 2 MiB (2097152 bytes)',
        'disk size: 396 KiB',
        'cluster_size: 65536',
        'backing file: base.raw',
        'backing file format: raw',
        'Format specific information:',
        '    compat: 1.1',
        '    compression type: zlib',
        '    lazy refcounts: false',
        '    refcount bits: 16',
        '    corrupt: false',
        '    extended l2: false',
        '',
      ].join('\n'),
    );
  });

  test('compat 0.10 images have no version 3 fields', () => {
    const json = infoToJson({ ...info, backingFilename: undefined, qcow2: { ...info.qcow2!, version: 2 } });
    expect(json['format-specific']).toEqual({
      type: 'qcow2',
      data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 },
    });
  });
});
