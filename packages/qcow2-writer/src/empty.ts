/**
 * Empty images (qemu-img create -f qcow2): any size up to the L1 limit, over a backing file or
 * with an external data file, with preallocation=metadata or not.
 */
import { ClusterMap } from './cluster-map.js';
import { emitImage } from './emit.js';
import { planLayout, type Qcow2Layout } from './layout.js';
import { type Qcow2ImageOptions, resolveGeometry } from './options.js';
import { type ByteSink, OutputWriter, type Qcow2Sink, toByteSink } from './sink.js';

export interface CreateImageOptions extends Qcow2ImageOptions {
  /** Guest size in bytes (required: a backing file's size is the caller's to look up). */
  readonly size: number;
  readonly signal?: AbortSignal;
}

/** The layout an empty image gets (its `fileSize` is the exact output length). */
export function planEmptyImage(options: CreateImageOptions): Qcow2Layout {
  const geometry = resolveGeometry(options, options.size);
  const map = new ClusterMap();
  if (geometry.preallocation === 'metadata') map.add(0, geometry.guestClusters, 'fill');
  return planLayout(geometry, map);
}

/**
 * Writes an empty qcow2 image to `sink` and closes it. Returns the number of bytes written.
 * Preallocated data clusters are written as zeros, or left as holes by sinks that can skip.
 */
export async function createEmptyImage(sink: Qcow2Sink, options: CreateImageOptions): Promise<number> {
  const layout = planEmptyImage(options);
  const byteSink = toByteSink(sink);
  await writeLayoutWithZeros(layout, byteSink, options.signal);
  return layout.fileSize;
}

async function writeLayoutWithZeros(
  layout: Qcow2Layout,
  sink: ByteSink,
  signal?: AbortSignal,
): Promise<void> {
  const out = new OutputWriter(sink);
  const clusterSize = layout.geometry.clusterSize;
  try {
    await emitImage(layout, out, {
      signal,
      group: (group, hostOffset) => out.zeroTo(hostOffset + layout.groupHostClusters[group]! * clusterSize),
    });
    await sink.close();
  } catch (error) {
    await sink.abort?.(error);
    throw error;
  }
}
