/**
 * Model-based runs: random writes (by qemu-io), snapshot create / apply / delete and
 * grows, checked against an in-memory model of the guest and of every snapshot; each run ends
 * with our check and qemu-img check clean and qemu-img compare equal to the model.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image } from '../src/check/index.js';
import { Qcow2Image } from '../src/image.js';
import { resizeImage } from '../src/ops/index.js';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../src/snapshot/index.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');
const START_SIZE = 1024 * 1024;

type Step =
  | { kind: 'write'; offset: number; length: number; pattern: number }
  | { kind: 'create' }
  | { kind: 'apply'; pick: number }
  | { kind: 'delete'; pick: number }
  | { kind: 'grow'; by: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant('write' as const),
      offset: fc.nat(START_SIZE - 1),
      length: fc.integer({ min: 1, max: 70_000 }),
      pattern: fc.integer({ min: 1, max: 255 }),
    }),
  },
  { weight: 2, arbitrary: fc.constant({ kind: 'create' as const }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('apply' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('delete' as const), pick: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('grow' as const),
      by: fc.integer({ min: 1, max: 512 }).map((n) => n * 512),
    }),
  },
);

describe.skipIf(!haveQemu)('snapshot model runs', () => {
  const dir = suiteTempDir('qcowkit-snapshot-model-');

  it('match the model, and qemu-img agrees', async () => {
    let run_ = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(512, 4096, 65536),
        fc.constantFrom(4, 16, 64),
        fc.array(step, { minLength: 1, maxLength: 12 }),
        async (clusterSize, refcountBits, steps) => {
          const path = join(dir.path, `model${run_++}.qcow2`);
          const created = await Qcow2Image.create(await FileBlockDevice.create(path, 0), {
            size: START_SIZE,
            clusterSize,
            refcountBits,
          });
          await created.close();
          let model = new Uint8Array(START_SIZE);
          const snapshots: { id: string; data: Uint8Array }[] = [];
          const onFile = async (action: (file: FileBlockDevice) => Promise<unknown>) => {
            const file = await FileBlockDevice.open(path);
            try {
              await action(file);
            } finally {
              await file.close();
            }
          };
          for (const s of steps) {
            switch (s.kind) {
              case 'write': {
                const offset = s.offset % model.length;
                const length = Math.min(s.length, model.length - offset);
                // Written by qemu-io: QEMU's copy-on-write over our snapshots.
                run('qemu-io', ['-c', `write -P ${s.pattern} ${offset} ${length}`, path]);
                model.fill(s.pattern, offset, offset + length);
                break;
              }
              case 'create': {
                let id = '';
                await onFile(async (file) => {
                  id = (await createSnapshot(file, `s${snapshots.length}`)).id;
                });
                snapshots.push({ id, data: model.slice() });
                break;
              }
              case 'apply': {
                if (snapshots.length === 0) break;
                const target = snapshots[s.pick % snapshots.length]!;
                await onFile((file) => applySnapshot(file, target.id));
                model = target.data.slice();
                break;
              }
              case 'delete': {
                if (snapshots.length === 0) break;
                const [victim] = snapshots.splice(s.pick % snapshots.length, 1);
                await onFile((file) => deleteSnapshot(file, victim!.id));
                break;
              }
              case 'grow': {
                const grown = new Uint8Array(model.length + s.by);
                grown.set(model);
                await onFile((file) => resizeImage(file, grown.length));
                model = grown;
                break;
              }
            }
          }
          await onFile(async (file) => {
            expect((await listSnapshots(file)).map((e) => e.id)).toEqual(snapshots.map((e) => e.id));
            const result = await checkQcow2Image({ file });
            expect(result.messages).toEqual([]);
            expect(result.corruptions + result.leaks + result.checkErrors).toBe(0);
          });
          for (const snapshot of snapshots) {
            const image = await Qcow2Image.open(await FileBlockDevice.open(path, { readOnly: true }), {
              snapshot: { id: snapshot.id },
              snapshotSize: 'snapshot',
            });
            const bytes = await image.read(0, image.size);
            await image.close();
            expect(Buffer.from(bytes).equals(Buffer.from(snapshot.data))).toBe(true);
          }
          const check = runStatus('qemu-img', ['check', path]);
          expect(check.status, check.stdout + check.stderr).toBe(0);
          const raw = `${path}.raw`;
          writeFileSync(raw, model);
          expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, path]).status).toBe(0);
          run('rm', ['-f', raw, path]);
        },
      ),
      { numRuns: 15 },
    );
  }, 120_000);
});
