/**
 * One record per step, the newest run's: how the panel folds the pages of
 * `GET jobs/{id}/metrics` it fetches. The rules are the server's
 * (cumulus_jupyter/metrics.py, docs/rest-api.md): a job resumed from a
 * checkpoint runs the steps after it again, and each step must show once.
 */
import { IMetrics } from './api';

/**
 * Fields that place a record (which step of which run, when, out of how
 * many) rather than measure anything: never plotted nor listed as metrics.
 * `POSITION_FIELDS` of cumulus_jupyter/metrics.py is the source;
 * tests/test_contracts.py checks that this copy agrees.
 */
export const POSITION_FIELDS: ReadonlySet<string> = new Set([
  'step',
  'total',
  'time',
  'epoch',
  'run'
]);

/** The run of a record: its `run` field, or 1 when it has none. */
export function runOf(record: IMetrics): number {
  const run = record.run;
  return typeof run === 'number' && Number.isInteger(run) && run >= 1 ? run : 1;
}

function finite(value: unknown): number | null {
  return typeof value === 'number' && isFinite(value) ? value : null;
}

/** Sort key of a step: records without an epoch first, then epoch, then step. */
type StepKey = [number, number, number];

/** Where a record sits in step order, or `null` without a numeric step. */
export function stepKey(record: IMetrics): StepKey | null {
  const step = finite(record.step);
  if (step === null) {
    return null;
  }
  const epoch = finite(record.epoch);
  return epoch === null ? [0, 0, step] : [1, epoch, step];
}

function compareKeys(a: StepKey, b: StepKey): number {
  return a[0] - b[0] || a[1] - b[1] || a[2] - b[2];
}

/**
 * Folds records, page after page in the order they were written, into one
 * record per step: a newer run's record replaces the held one, the same
 * run's is merged into it, an older run's is ignored. Holds at most
 * `maxSteps` steps (every other one is dropped past it: the shape stays).
 */
export class StepMerger {
  constructor(readonly maxSteps = 1000) {}

  /** Fold one record in. */
  add(record: IMetrics): void {
    const run = runOf(record);
    const withRun: IMetrics = { ...record, run };
    this._arrivals++;
    const order: [number, number, number] = [
      run,
      finite(record.time) ?? 0,
      this._arrivals
    ];
    const key = stepKey(record);
    if (key !== null) {
      const id = key.join(':');
      const held = this._steps.get(id);
      if (held === undefined || run > runOf(held.record)) {
        this._steps.set(id, { key, record: withRun });
      } else if (run === runOf(held.record)) {
        held.record = { ...held.record, ...withRun };
      } else {
        return; // a newer run already reported this step
      }
      if (this._steps.size > this.maxSteps) {
        this._thin();
      }
    }
    for (const [field, value] of Object.entries(withRun)) {
      const seen = this._latest.get(field);
      if (seen === undefined || compareKeys(order, seen.order) >= 0) {
        this._latest.set(field, { order, value });
      }
    }
  }

  /** The records with a step, one per step, in step order. */
  steps(): IMetrics[] {
    return [...this._steps.values()]
      .sort((a, b) => compareKeys(a.key, b.key))
      .map(s => s.record);
  }

  /**
   * Each field's value in the newest record holding it (newest run first,
   * then newest `time`): the newest run's latest step, not the highest step
   * an earlier run reached before it was resumed.
   */
  latest(): IMetrics | undefined {
    if (!this._latest.size) {
      return undefined;
    }
    const out: IMetrics = {};
    for (const [field, { value }] of this._latest) {
      out[field] = value;
    }
    return out;
  }

  private _thin(): void {
    const entries = [...this._steps.entries()].sort((a, b) =>
      compareKeys(a[1].key, b[1].key)
    );
    // Every other step, keeping the newest.
    for (let i = entries.length - 2; i >= 0; i -= 2) {
      this._steps.delete(entries[i][0]);
    }
  }

  private _arrivals = 0;
  private _latest = new Map<
    string,
    { order: [number, number, number]; value: unknown }
  >();
  private _steps = new Map<string, { key: StepKey; record: IMetrics }>();
}
