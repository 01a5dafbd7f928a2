/**
 * The server's event log, followed with long-polls (`GET events?since=N&wait=S`):
 * every change of every job, once, in order. The panel learns from it which
 * jobs to fetch again; the notifier, what to announce.
 */
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { JobState, requestAPI } from './api';

/** One event of the server's log (see cumulus_jupyter/server/events.py). */
export interface IJobEvent {
  seq: number;
  time: number;
  /** "state", "restart", "escalation", "checkpoint" or "deleted". */
  kind: string;
  job: string;
  name: string;
  run?: number;
  old?: JobState | null;
  new?: JobState | null;
  message?: string;
  /** False for a job submitted with notify=False: not announced. */
  notify?: boolean;
  /** What the job reported last (loss, epoch...). */
  metrics?: { [key: string]: unknown };
}

/** What one call of `GET events` answers. */
export interface IEventsAnswer {
  events: IJobEvent[];
  /** The newest event's number. */
  last: number;
  /** The oldest event the server still keeps. */
  first: number;
}

/** A batch of new events; the first batch (`initial`) has none, only where the log stands. */
export interface IEventBatch {
  events: IJobEvent[];
  /** True for the first batch: the log's position when this page began to follow it. */
  initial: boolean;
  /** The newest event's number after this batch. */
  last: number;
}

/** How long one long-poll may wait (the server allows up to 60 s). */
const WAIT_SECONDS = 25;
/** Pause after a failed request, doubled up to the maximum while it fails. */
const RETRY_MS = 1000;
const RETRY_MAX_MS = 30 * 1000;

export class EventStream implements IDisposable {
  /** Batches of new events, in order (the first one with `initial`). */
  get received(): ISignal<this, IEventBatch> {
    return this._received;
  }

  /**
   * Emitted when events may have been missed (the server kept fewer than
   * were made while this page was away, or it is another server now): whoever
   * keeps a view built from events should fetch it whole again.
   */
  get missed(): ISignal<this, void> {
    return this._missed;
  }

  /** Whether the last request was answered: events can be relied on now. */
  get connected(): boolean {
    return this._connected;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Follow the log until disposed. */
  start(): void {
    if (!this._running) {
      this._running = true;
      void this._follow();
    }
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._abort.abort();
    Signal.clearData(this);
  }

  private async _follow(): Promise<void> {
    let retry = RETRY_MS;
    while (!this._disposed) {
      const since = this._since;
      try {
        // The first request only learns where the log stands (no history:
        // whoever wants some asks for it with `readEvents`).
        const answer =
          since === null
            ? await readEvents(0, 0, 1, this._abort.signal)
            : await readEvents(since, WAIT_SECONDS, 1000, this._abort.signal);
        if (this._disposed) {
          return;
        }
        retry = RETRY_MS;
        const wasConnected = this._connected;
        this._connected = true;
        if (
          since !== null &&
          (answer.last < since || answer.first > since + 1 || !wasConnected)
        ) {
          // Another log (a server with another job root), a log that dropped
          // what this page had not seen yet, or a gap while unreachable.
          this._missed.emit();
        }
        if (answer.events.length || since === null) {
          this._received.emit({
            events: since === null ? [] : answer.events,
            initial: since === null,
            last: answer.last
          });
        }
        this._since = answer.last;
      } catch {
        if (this._disposed) {
          return;
        }
        this._connected = false;
        await new Promise(resolve => setTimeout(resolve, retry));
        retry = Math.min(retry * 2, RETRY_MAX_MS);
      }
    }
  }

  private _abort = new AbortController();
  private _connected = false;
  private _disposed = false;
  private _missed = new Signal<this, void>(this);
  private _received = new Signal<this, IEventBatch>(this);
  private _running = false;
  private _since: number | null = null;
}

/** One call of `GET events`: events after `since`, waiting up to `wait` seconds for one. */
export function readEvents(
  since: number,
  wait = 0,
  limit = 1000,
  signal?: AbortSignal
): Promise<IEventsAnswer> {
  return requestAPI<IEventsAnswer>('events', signal ? { signal } : {}, {
    since,
    wait,
    limit
  });
}

let shared: EventStream | null = null;

/** The page's one follower of the event log (the panel and the notifier share it). */
export function sharedEvents(): EventStream {
  if (!shared || shared.isDisposed) {
    shared = new EventStream();
    shared.start();
  }
  return shared;
}
