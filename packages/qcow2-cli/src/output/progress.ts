/**
 * The `-p` progress line.
 *
 * Not on a terminal (a pipe, a file, a test): qemu-img's exact line, `    (12.34/100%)\r`, written
 * each time the figure moves by at least 1% and at 0% and 100%, then a newline, so logs and
 * scripts see what qemu-img prints (qemu-img also prints it when its output is not a terminal).
 * On a terminal: the same figure followed by a bar as wide as the terminal allows (`COLUMNS`,
 * else 80), redrawn in place every 0.1%.
 */
import type { CliIo, CliOutput } from '../io.js';

/** Columns left of the bar: `    (100.00/100%) [` and `]`. */
const FIGURE_WIDTH = 19;
const MIN_BAR = 10;
const MAX_BAR = 60;

export interface ProgressLayout {
  /** Draw the terminal form with a bar; false: qemu-img's plain line. */
  readonly terminal: boolean;
  /** Terminal width in columns (terminal form only). */
  readonly columns?: number;
}

export class ProgressReporter {
  private lastShown = -1;
  private readonly step: number;
  private readonly barWidth: number;

  constructor(
    private readonly out: CliOutput,
    private readonly layout: ProgressLayout = { terminal: false },
  ) {
    this.step = layout.terminal ? 0.1 : 1;
    const columns = layout.columns ?? 80;
    this.barWidth = Math.max(MIN_BAR, Math.min(MAX_BAR, columns - FIGURE_WIDTH - 1));
  }

  /** Shows the new figure when it moved by at least one step (and always at 0 and 100%). */
  update(done: number, total: number): void {
    const percent = total === 0 ? 100 : Math.min(100, (done * 100) / total);
    if (this.lastShown >= 0 && percent < 100 && percent - this.lastShown < this.step) return;
    if (percent === this.lastShown) return;
    this.lastShown = percent;
    this.out.write(this.render(percent));
  }

  finish(): void {
    this.update(1, 1);
    this.out.write('\n');
  }

  private render(percent: number): string {
    const figure = `    (${percent.toFixed(2)}/100%)`;
    if (!this.layout.terminal) return `${figure}\r`;
    const filled = Math.floor((percent / 100) * this.barWidth);
    const bar = `${'#'.repeat(filled)}${'.'.repeat(this.barWidth - filled)}`;
    return `\r${figure.padEnd(FIGURE_WIDTH - 2)} [${bar}]`;
  }
}

/** The reporter for a command's `-p` (undefined when not asked for): the terminal form when
 * stderr is a terminal, qemu-img's plain line otherwise. */
export function progressReporter(io: CliIo, enabled: boolean): ProgressReporter | undefined {
  if (!enabled) return undefined;
  const columns = Number(io.env.COLUMNS);
  return new ProgressReporter(io.stderr, {
    terminal: io.isTTY,
    ...(Number.isInteger(columns) && columns > 0 ? { columns } : {}),
  });
}
