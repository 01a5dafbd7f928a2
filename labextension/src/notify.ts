/**
 * JupyterLab notifications for the server's jobs: when a job completes,
 * fails, pauses, times out or is lost, a notification names it and what
 * happened, with "Show" (the panel, on that job) and, for a job that can go
 * on, "Resume".
 *
 * Each event is announced once per browser: the last announced sequence
 * number is kept in localStorage (per server), and tabs take turns under a
 * Web Lock, so a reload or a second tab does not announce it again. Events
 * made while no tab was open are announced at the next start (the newest
 * few; more are summed up in one notification).
 */
import { PageConfig } from '@jupyterlab/coreutils';
import { Notification } from '@jupyterlab/apputils';

import { JobState, jobPath, requestAPI } from './api';
import { EventStream, IEventBatch, IJobEvent, readEvents } from './events';

/** The states announced unless the settings say otherwise. */
export const DEFAULT_NOTIFY_STATES: JobState[] = [
  'completed',
  'failed',
  'paused',
  'timed_out',
  'lost'
];

/** At most this many events made while no tab was open are announced one by one. */
const BACKLOG = 5;

const WORDS: { [state: string]: string } = {
  completed: 'completed',
  failed: 'failed',
  paused: 'paused',
  timed_out: 'reached its time limit',
  lost: 'was lost',
  cancelled: 'was cancelled',
  running: 'is running',
  queued: 'is queued'
};

const TYPES: { [state: string]: Notification.TypeOptions } = {
  completed: 'success',
  failed: 'error',
  lost: 'error',
  timed_out: 'warning',
  paused: 'info'
};

export namespace JobNotifier {
  export interface IOptions {
    events: EventStream;
    /** Open the panel on a job. */
    show: (jobId: string) => void;
  }
}

export class JobNotifier {
  constructor(options: JobNotifier.IOptions) {
    this._show = options.show;
    options.events.received.connect(this._onEvents, this);
  }

  /** The states that are announced (from the settings). */
  states: ReadonlySet<string> = new Set(DEFAULT_NOTIFY_STATES);
  /** Whether anything is announced (from the settings). */
  enabled = true;

  private get _key(): string {
    return `cumulus-jupyter:announced:${PageConfig.getBaseUrl()}`;
  }

  private _onEvents(_: EventStream, batch: IEventBatch): void {
    void withLock(this._key, () => this._announce(batch)).catch(reason =>
      console.warn('cumulus-jupyter: could not announce job events', reason)
    );
  }

  /** Announce what no tab of this browser has announced yet. */
  private async _announce(batch: IEventBatch): Promise<void> {
    const stored = window.localStorage.getItem(this._key);
    const last = stored === null ? NaN : Number(stored);
    if (Number.isNaN(last) || last > batch.last) {
      // First time here (or another server's numbers): announce from now on.
      window.localStorage.setItem(this._key, String(batch.last));
      return;
    }
    if (batch.initial && last < batch.last) {
      // What happened while no tab of this browser was open.
      const missed = await readEvents(last);
      batch = { ...batch, events: missed.events };
    }
    const fresh = batch.events.filter(
      e =>
        e.seq > last &&
        e.seq <= batch.last && // later ones come with the stream's next batch
        e.kind === 'state' &&
        e.notify !== false &&
        e.new &&
        this.states.has(e.new)
    );
    window.localStorage.setItem(this._key, String(Math.max(last, batch.last)));
    if (!this.enabled) {
      return;
    }
    if (batch.initial && fresh.length > BACKLOG) {
      Notification.info(
        `${fresh.length} cumulus jobs changed while JupyterLab was closed`,
        {
          autoClose: false,
          actions: [{ label: 'Show', callback: () => this._show('') }]
        }
      );
      return;
    }
    for (const event of fresh) {
      this._notify(event);
    }
  }

  private _notify(event: IJobEvent): void {
    const state = event.new as JobState;
    const actions: Notification.IAction[] = [
      {
        label: 'Show',
        caption: 'Open the Cumulus jobs panel on this job',
        callback: () => this._show(event.job)
      }
    ];
    if (state === 'paused' || state === 'timed_out') {
      actions.push({
        label: 'Resume',
        caption: 'Resume the job from its newest checkpoint',
        displayType: 'accent',
        callback: () => {
          requestAPI(jobPath(event.job, 'resume'), {
            method: 'POST',
            body: '{}'
          }).catch(error =>
            Notification.error(
              `Could not resume ${event.name}: ${(error as Error).message}`
            )
          );
        }
      });
    }
    const detail =
      event.message && event.message !== state ? `: ${event.message}` : '';
    Notification.emit(
      `Job ${event.name} (${event.job}) ${WORDS[state] ?? state}${detail}`,
      TYPES[state] ?? 'info',
      {
        autoClose: state === 'failed' || state === 'lost' ? false : 10000,
        actions
      }
    );
  }

  private _show: (jobId: string) => void;
}

/** Run `work` while holding the browser-wide lock `name` (tabs take turns). */
async function withLock(
  name: string,
  work: () => Promise<void>
): Promise<void> {
  const locks = (navigator as any).locks;
  if (locks?.request) {
    await locks.request(name, work);
  } else {
    await work(); // no Web Locks: one tab at a time is not guaranteed
  }
}
