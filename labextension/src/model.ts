/**
 * The panel's view of the job server: one poll that keeps the job list, the
 * GPU shares, each job's latest `report()` and the open job's details fresh.
 *
 * With the server's event log followed (an `EventStream`), the list is read
 * whole once; after that an update fetches only the jobs an event named and
 * the active ones (whose progress moves), and an event triggers one at once.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';
import { IDisposable } from '@lumino/disposable';

import {
  ACTIVE,
  CumulusError,
  ICheckpoint,
  IGpu,
  IJob,
  ILogChunk,
  IMetrics,
  JobAction,
  jobPath,
  requestAPI
} from './api';
import { EventStream, IEventBatch } from './events';
import { StepMerger } from './metrics';

/** How much of the open job's log the panel keeps. */
const LOG_TAIL_BYTES = 16 * 1024;

/** Poll timing: every 2 s, backing off to 30 s while the server fails. */
export const POLL_INTERVAL = 2000;
const POLL_MAX = 30 * 1000;

/** The details of the job opened in the panel. */
export interface IJobDetail {
  id: string;
  checkpoints: ICheckpoint[];
  log: string;
  logOffset: number;
}

export namespace JobsModel {
  export interface IOptions {
    /** Whether anyone can see the panel; the poll stands by while not. */
    isVisible: () => boolean;
    /** The server's events: which jobs changed (without it, every job is read each time). */
    events?: EventStream;
  }
}

export class JobsModel implements IDisposable {
  constructor(options: JobsModel.IOptions) {
    this._isVisible = options.isVisible;
    this._events = options.events ?? null;
    if (this._events) {
      this._events.received.connect(this._onEvents, this);
      this._events.missed.connect(this._onMissed, this);
    }
    this._poll = new Poll({
      auto: false,
      factory: () => this._update(),
      frequency: { interval: POLL_INTERVAL, backoff: true, max: POLL_MAX },
      name: 'cumulus-jupyter:jobs',
      // Stop polling while the panel is collapsed, and while the browser tab
      // is hidden.
      standby: () => (this._isVisible() ? 'when-hidden' : true)
    });
  }

  /** Emitted after every update, successful or not. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Every job of the server, oldest first. */
  get jobs(): readonly IJob[] {
    return this._jobs;
  }

  /** Each device's shares. */
  get gpus(): readonly IGpu[] {
    return this._gpus;
  }

  /** Why the last update failed, or `null`. */
  get error(): string | null {
    return this._error;
  }

  /** Whether the job list has been fetched at least once. */
  get loaded(): boolean {
    return this._loaded;
  }

  /** The opened job's checkpoints and log tail, once fetched. */
  get detail(): IJobDetail | null {
    return this._detail && this._detail.id === this._selected
      ? this._detail
      : null;
  }

  /** The id of the job opened in the panel, or `null`. */
  get selected(): string | null {
    return this._selected;
  }

  /**
   * Everything a job has reported so far, merged: the latest value of each
   * key (the newest run's, when a resume ran steps again).
   */
  metrics(id: string): IMetrics | undefined {
    return this._metrics.get(id)?.merger.latest();
  }

  /** A job's records with a step: one per step (the newest run's), in step order. */
  steps(id: string): IMetrics[] {
    return this._metrics.get(id)?.merger.steps() ?? [];
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Start polling (the first update runs at once). */
  start(): Promise<void> {
    return this._poll.start();
  }

  /** Update now, and wait for it. */
  async refresh(): Promise<void> {
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Open a job's details (or close them with `null`). */
  select(id: string | null): void {
    if (id === this._selected) {
      return;
    }
    this._selected = id;
    this._detail = null;
    this._changed.emit();
    this._refreshSoon();
  }

  /** Ask the server to pause, resume or cancel a job; update when it answers. */
  async act(
    id: string,
    action: Exclude<JobAction, 'delete'>,
    body: { [key: string]: unknown } = {}
  ): Promise<IJob> {
    const job = await requestAPI<IJob>(jobPath(id, action), {
      method: 'POST',
      body: JSON.stringify(body)
    });
    this._replace(job);
    this._refreshSoon();
    return job;
  }

  /** Delete one of a job's checkpoints. */
  async deleteCheckpoint(id: string, name: string): Promise<void> {
    await requestAPI<void>(jobPath(id, 'checkpoints', name), {
      method: 'DELETE'
    });
    if (this._detail && this._detail.id === id) {
      this._detail = {
        ...this._detail,
        checkpoints: this._detail.checkpoints.filter(c => c.name !== name)
      };
      this._changed.emit();
    }
    this._refreshSoon();
  }

  /** Update now without waiting; a failure shows in `error` (and the banner). */
  private _refreshSoon(): void {
    this.refresh().catch(() => undefined);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._events?.received.disconnect(this._onEvents, this);
    this._events?.missed.disconnect(this._onMissed, this);
    this._poll.dispose();
    Signal.clearData(this);
  }

  private _onEvents(_: EventStream, batch: IEventBatch): void {
    if (batch.initial) {
      // Where the log stood when this page began to follow it: a change made
      // between the first read of the jobs and then would be missed.
      this._onMissed();
      return;
    }
    for (const event of batch.events) {
      this._stale.add(event.job);
      if (event.kind === 'state' || event.kind === 'deleted') {
        this._gpusStale = true; // shares are taken and freed as jobs start and end
      }
    }
    this._refreshSoon();
  }

  private _onMissed(): void {
    this._readAll = true;
    this._refreshSoon();
  }

  /** The job list and GPU shares: whole, or only what changed since the last update. */
  private async _fetchJobs(): Promise<{ jobs: IJob[]; gpus: IGpu[] }> {
    if (this._readAll || !this._events?.connected) {
      // Forget what was stale before asking, not after: an event that comes
      // while the list is on its way may be newer than the list.
      this._readAll = false;
      this._stale.clear();
      this._gpusStale = false;
      try {
        return await requestAPI<{ jobs: IJob[]; gpus: IGpu[] }>('jobs');
      } catch (error) {
        this._readAll = true;
        throw error;
      }
    }
    const ids = new Set(this._stale);
    this._stale.clear();
    for (const job of this._jobs) {
      if (ACTIVE.has(job.state)) {
        ids.add(job.id); // its elapsed time and message move on
      }
    }
    const byId = new Map(this._jobs.map(j => [j.id, j]));
    await Promise.all(
      [...ids].map(async id => {
        try {
          byId.set(id, await requestAPI<IJob>(jobPath(id)));
        } catch (error) {
          if ((error as CumulusError).status !== 404) {
            this._stale.add(id); // try again at the next update
            throw error;
          }
          byId.delete(id); // deleted
        }
      })
    );
    let gpus = this._gpus as IGpu[];
    if (this._gpusStale) {
      this._gpusStale = false;
      try {
        gpus = (await requestAPI<{ gpus: IGpu[] }>('gpus')).gpus;
      } catch (error) {
        this._gpusStale = true;
        throw error;
      }
    }
    const jobs = [...byId.values()].sort(
      (a, b) =>
        (a.created ?? 0) - (b.created ?? 0) ||
        (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)
    );
    return { jobs, gpus };
  }

  private async _update(): Promise<void> {
    try {
      const { jobs, gpus } = await this._fetchJobs();
      const known = new Set(jobs.map(j => j.id));
      for (const id of this._metrics.keys()) {
        if (!known.has(id)) {
          this._metrics.delete(id);
        }
      }
      // An active job's metrics are fetched at every update, from where the
      // last update stopped, and once more after it stops (its last records);
      // a job first seen stopped, once.
      const wasActive = new Set(
        this._jobs.filter(j => ACTIVE.has(j.state)).map(j => j.id)
      );
      await Promise.all(
        jobs
          .filter(
            j =>
              ACTIVE.has(j.state) ||
              wasActive.has(j.id) ||
              !this._metrics.has(j.id)
          )
          .map(j => this._fetchMetrics(j.id))
      );
      const selected = this._selected;
      if (selected !== null && known.has(selected)) {
        await this._fetchDetail(selected);
      }
      this._jobs = jobs;
      this._gpus = gpus;
      this._error = null;
      this._loaded = true;
    } catch (error) {
      this._error = (error as Error).message ?? String(error);
      // Rejecting makes the poll back off until the server answers again.
      throw error;
    } finally {
      this._changed.emit();
    }
  }

  private async _fetchMetrics(id: string): Promise<void> {
    const seen = this._metrics.get(id) ?? {
      next: 0,
      merger: new StepMerger()
    };
    const answer = await requestAPI<{ metrics: IMetrics[]; next: number }>(
      jobPath(id, 'metrics'),
      {},
      { since: seen.next }
    );
    // Pages come one record per step; a resumed run's records replace the
    // earlier run's for the steps it ran again.
    for (const record of answer.metrics) {
      seen.merger.add(record);
    }
    seen.next = answer.next;
    this._metrics.set(id, seen);
  }

  private async _fetchDetail(id: string): Promise<void> {
    const { checkpoints } = await requestAPI<{ checkpoints: ICheckpoint[] }>(
      jobPath(id, 'checkpoints')
    );
    const previous =
      this._detail && this._detail.id === id ? this._detail : null;
    let offset = previous?.logOffset;
    if (offset === undefined) {
      // First look at this job: start near the end of its log.
      const probe = await requestAPI<ILogChunk>(
        jobPath(id, 'logs'),
        {},
        { offset: Number.MAX_SAFE_INTEGER }
      );
      offset = Math.max(0, probe.size - LOG_TAIL_BYTES);
    }
    const chunk = await requestAPI<ILogChunk>(
      jobPath(id, 'logs'),
      {},
      { offset }
    );
    if (this._selected !== id) {
      return; // another job was opened meanwhile
    }
    // Only a first read that starts inside the log begins mid-line.
    const atLineStart = previous !== null || offset === 0;
    const log = trimLog((previous?.log ?? '') + chunk.data, atLineStart);
    this._detail = { id, checkpoints, log, logOffset: chunk.next_offset };
  }

  private _replace(job: IJob): void {
    this._jobs = this._jobs.map(j => (j.id === job.id ? { ...j, ...job } : j));
    this._changed.emit();
  }

  private _changed = new Signal<this, void>(this);
  private _detail: IJobDetail | null = null;
  private _events: EventStream | null;
  private _gpusStale = false;
  private _readAll = true;
  private _stale = new Set<string>();
  private _error: string | null = null;
  private _gpus: IGpu[] = [];
  private _isVisible: () => boolean;
  private _jobs: IJob[] = [];
  private _loaded = false;
  private _metrics = new Map<string, { next: number; merger: StepMerger }>();
  private _poll: Poll;
  private _selected: string | null = null;
}

/**
 * Keep the last `LOG_TAIL_BYTES` of a log, cut at a line start, and render
 * carriage-return redraws (progress bars) as their final state.
 */
export function trimLog(text: string, atLineStart: boolean): string {
  let out = text;
  if (out.length > LOG_TAIL_BYTES) {
    out = out.slice(out.length - LOG_TAIL_BYTES);
    atLineStart = false;
  }
  if (!atLineStart) {
    const newline = out.indexOf('\n');
    if (newline >= 0 && newline < out.length - 1) {
      out = out.slice(newline + 1);
    }
  }
  return out
    .split('\n')
    .map(line => {
      const parts = line.split('\r').filter(p => p.length > 0);
      return parts.length ? parts[parts.length - 1] : '';
    })
    .join('\n');
}
