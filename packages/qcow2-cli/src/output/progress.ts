/** qemu-img's `-p` progress line: `    (12.34/100%)` rewritten in place with `\r`. */
import type { CliOutput } from '../io.js';

export class ProgressReporter {
  private lastShown = -1;
  constructor(private readonly out: CliOutput) {}

  /** Shows the new figure when it moved by at least 1% (and always at 0 and 100%). */
  update(done: number, total: number): void {
    const percent = total === 0 ? 100 : (done * 100) / total;
    if (this.lastShown >= 0 && percent < 100 && percent - this.lastShown < 1) return;
    if (percent === this.lastShown) return;
    this.lastShown = percent;
    this.out.write(`    (${percent.toFixed(2)}/100%)\r`);
  }

  finish(): void {
    this.update(1, 1);
    this.out.write('\n');
  }
}
