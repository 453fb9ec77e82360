/**
 * The bounded read-ahead pipeline both read-once conversions run: chunks are started in guest
 * order over a fixed ring of slots, at most one per slot in flight, and a slot is started again
 * only once the writes of its previous chunk (`slot.writes`) are done.
 */
import type { ClusterRange } from './read-ahead.js';

/** A reusable buffer set of the pipeline; `writes` settles once its last chunk's writes are done. */
export interface PipelineSlot {
  writes: Promise<void>;
}

/** A started chunk, yielded in guest order. */
export interface PipelineChunk<S extends PipelineSlot, T> {
  readonly range: ClusterRange;
  readonly slot: S;
  /** What `start` resolved with for this chunk. */
  readonly result: T;
}

/**
 * Yields each of `ranges` once `start(slot, range)` for it resolves, keeping up to
 * `slots.length` chunks started ahead. The consumer sets `slot.writes` before asking for the next
 * chunk: the slot's next chunk starts after those writes. A start that fails is thrown when its
 * turn comes.
 */
export async function* chunkPipeline<S extends PipelineSlot, T>(
  ranges: Iterator<ClusterRange>,
  slots: readonly S[],
  start: (slot: S, range: ClusterRange) => Promise<T>,
): AsyncGenerator<PipelineChunk<S, T>> {
  const depth = slots.length;
  const queue: { range: ClusterRange; slot: S; job: Promise<T> }[] = [];
  let issued = 0;
  let exhausted = false;
  const fill = () => {
    while (!exhausted && queue.length < depth) {
      const next = ranges.next();
      if (next.done) {
        exhausted = true;
        break;
      }
      const range = next.value;
      const slot = slots[issued++ % depth]!;
      const job = slot.writes.then(() => start(slot, range));
      job.catch(() => {}); // observed when its turn comes
      queue.push({ range, slot, job });
    }
  };
  fill();
  while (queue.length > 0) {
    const { range, slot, job } = queue.shift()!;
    yield { range, slot, result: await job };
    fill();
  }
}
