/** Runs `tasks` with at most `concurrency` in flight; rejects with the first failure after all settle. */
export async function runBounded(
  tasks: readonly (() => Promise<void>)[],
  concurrency: number,
): Promise<void> {
  if (tasks.length === 0) return;
  if (tasks.length === 1) return tasks[0]!();
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (next < tasks.length && failure === undefined) {
      const task = tasks[next++]!;
      try {
        await task();
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  const workers: Promise<void>[] = [];
  for (let index = 0; index < Math.min(concurrency, tasks.length); index++) workers.push(worker());
  await Promise.all(workers);
  if (failure !== undefined) throw failure.error;
}
