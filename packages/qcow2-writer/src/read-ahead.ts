/** Ordered read-ahead: runs up to `depth` fetches ahead of the consumer, yields results in order. */
export async function* readAhead<T, R>(
  items: Iterable<T>,
  depth: number,
  fetch: (item: T) => Promise<R>,
): AsyncGenerator<{ item: T; result: R }> {
  const queue: { item: T; result: Promise<R> }[] = [];
  const iterator = items[Symbol.iterator]();
  let done = false;
  const fill = () => {
    while (!done && queue.length < depth) {
      const next = iterator.next();
      if (next.done) {
        done = true;
        break;
      }
      const result = fetch(next.value);
      result.catch(() => {}); // observed when its turn comes
      queue.push({ item: next.value, result });
    }
  };
  fill();
  while (queue.length > 0) {
    const head = queue.shift()!;
    const result = await head.result;
    fill();
    yield { item: head.item, result };
  }
}

/** A guest cluster range. */
export interface ClusterRange {
  readonly cluster: number;
  readonly count: number;
}

/** Splits `[cluster, cluster + count)` into ranges of at most `maxCount` clusters. */
export function* splitRange(cluster: number, count: number, maxCount: number): Generator<ClusterRange> {
  for (let at = cluster; at < cluster + count; at += maxCount) {
    yield { cluster: at, count: Math.min(maxCount, cluster + count - at) };
  }
}
