/**
 * The "Cumulus jobs" side panel: every job of the server, its controls, its
 * checkpoints, log and metrics, and the GPU shares.
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import React from 'react';

import { ACTIVE, ICheckpoint, IGpu, IJob, IMetrics, LEGAL } from './api';
import { cumulusIcon } from './icon';
import { JobsModel } from './model';

/** Keys of a `report()` record that are not metrics to show. */
const NOT_METRICS = new Set(['time', 'step', 'total', 'epoch', 'run']);
/** Line colours of the metrics chart; one metric each, the first ones by name. */
const PALETTE = ['#1565c0', '#c62828', '#2e7d32', '#6a1b9a', '#ef6c00'];

export class JobsPanel extends ReactWidget {
  constructor() {
    super();
    this.id = 'cumulus-jobs';
    this.title.icon = cumulusIcon;
    this.title.caption = 'Cumulus jobs';
    this.addClass('jp-CumulusPanel');
    this.model = new JobsModel({
      isVisible: () => this.isVisible
    });
    void this.model.start();
  }

  readonly model: JobsModel;

  dispose(): void {
    this.model.dispose();
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    // The poll stood by while the panel was hidden: catch up at once.
    void this.model.refresh().catch(() => undefined);
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => <PanelView model={this.model} />}
      </UseSignal>
    );
  }
}

function PanelView({ model }: { model: JobsModel }): JSX.Element {
  const jobs = model.jobs;
  const names = new Map(jobs.map(j => [j.id, j.name]));
  return (
    <div className="jp-CumulusPanel-body">
      <header className="jp-CumulusPanel-header">
        <h2>Cumulus jobs</h2>
        <button
          className="jp-CumulusPanel-refresh jp-Button jp-mod-minimal"
          title="Refresh now"
          onClick={() => void model.refresh().catch(() => undefined)}
        >
          ⟳
        </button>
      </header>
      {model.error && (
        <div className="jp-CumulusPanel-error" role="alert">
          Cannot update the job list: {model.error}
        </div>
      )}
      <GpuShares gpus={model.gpus} names={names} />
      {!model.loaded && !model.error && (
        <p className="jp-CumulusPanel-empty">Loading jobs…</p>
      )}
      {model.loaded && jobs.length === 0 && (
        <p className="jp-CumulusPanel-empty">
          No jobs yet. Run a notebook cell with <code>%%cumulus</code>, or{' '}
          <code>CumulusClient().run(train)</code> from Python.
        </p>
      )}
      <ul className="jp-CumulusPanel-jobs">
        {[...jobs].reverse().map(job => (
          <JobItem
            key={job.id}
            job={job}
            model={model}
            metrics={model.metrics(job.id)}
            open={model.selected === job.id}
          />
        ))}
      </ul>
    </div>
  );
}

function GpuShares({
  gpus,
  names
}: {
  gpus: readonly IGpu[];
  names: Map<string, string>;
}): JSX.Element | null {
  if (!gpus.length) {
    return null;
  }
  return (
    <section className="jp-CumulusPanel-gpus" aria-label="GPU shares">
      {gpus.map(gpu => {
        const holders = Object.entries(gpu.jobs);
        const label = gpu.device === 'cpu' ? 'CPU' : `GPU ${gpu.device}`;
        return (
          <div key={gpu.device} className="jp-CumulusPanel-gpu">
            <div className="jp-CumulusPanel-gpuHead">
              <span>{label}</span>
              <span>{percent(gpu.used)} taken</span>
            </div>
            <div className="jp-CumulusPanel-bar" title={percent(gpu.used)}>
              <div style={{ width: percent(Math.min(1, gpu.used)) }} />
            </div>
            <div className="jp-CumulusPanel-gpuJobs">
              {holders.length
                ? holders
                    .map(
                      ([id, share]) =>
                        `${names.get(id) ?? id} (${id.slice(0, 6)}) ${percent(share)}`
                    )
                    .join(' · ')
                : 'free'}
            </div>
          </div>
        );
      })}
    </section>
  );
}

function JobItem({
  job,
  model,
  metrics,
  open
}: {
  job: IJob;
  model: JobsModel;
  metrics: IMetrics | undefined;
  open: boolean;
}): JSX.Element {
  const [busy, setBusy] = React.useState(false);
  const act = async (action: 'pause' | 'resume' | 'cancel') => {
    if (action === 'cancel') {
      const answer = await showDialog({
        title: `Cancel ${job.name}?`,
        body: 'Its process is stopped now. Its checkpoints stay on disk.',
        buttons: [
          Dialog.cancelButton({ label: 'Keep running' }),
          Dialog.warnButton({ label: 'Cancel job' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    setBusy(true);
    try {
      await model.act(job.id, action);
    } catch (error) {
      await showErrorMessage(
        `Cannot ${action} ${job.name}`,
        (error as Error).message
      );
    } finally {
      setBusy(false);
    }
  };
  const stopping = job.cancel_requested !== null && ACTIVE.has(job.state);
  const progress = progressOf(metrics);
  return (
    <li
      className={`jp-CumulusJob jp-mod-${job.state}${open ? ' jp-mod-open' : ''}`}
      data-job-id={job.id}
      data-state={job.state}
    >
      <div
        className="jp-CumulusJob-summary"
        role="button"
        tabIndex={0}
        aria-expanded={open}
        title={open ? 'Hide details' : 'Show checkpoints, log and metrics'}
        onClick={() => model.select(open ? null : job.id)}
        onKeyDown={e => {
          if (e.key === 'Enter' || e.key === ' ') {
            e.preventDefault();
            model.select(open ? null : job.id);
          }
        }}
      >
        <div className="jp-CumulusJob-title">
          <span className="jp-CumulusJob-name">{job.name}</span>
          <span className="jp-CumulusJob-id">{job.id}</span>
          <span className={`jp-CumulusJob-state jp-mod-${job.state}`}>
            {job.state.replace('_', ' ')}
          </span>
        </div>
        <div className="jp-CumulusJob-facts">
          <span title="elapsed / time limit of this run">
            {clock(job.elapsed)} /{' '}
            {job.duration === null ? 'no limit' : clock(job.duration)}
          </span>
          {ACTIVE.has(job.state) ? (
            <span title="the device it runs on, and its share of that device's memory">
              {deviceLabel(job)} · {percent(job.gpu_memory)}
            </span>
          ) : (
            <span title="the share it asks for; a stopped job holds none">
              {percent(job.gpu_memory)} share
            </span>
          )}
          {job.run > 1 && <span>run {job.run}</span>}
        </div>
        {progress && (
          <div
            className="jp-CumulusJob-progress"
            title={`step ${progress.step} of ${progress.total}`}
          >
            <div className="jp-CumulusPanel-bar">
              <div style={{ width: percent(progress.fraction) }} />
            </div>
            <span>
              {progress.step} / {progress.total}
            </span>
          </div>
        )}
        {job.message && job.message !== job.state && (
          <div className="jp-CumulusJob-message">{job.message}</div>
        )}
      </div>
      <div className="jp-CumulusJob-actions">
        <ActionButton
          label="Pause"
          title="Save a checkpoint at the next batch and free the GPU"
          disabled={busy || stopping || !LEGAL.pause.has(job.state)}
          onClick={() => void act('pause')}
        />
        <ActionButton
          label="Resume"
          title="Continue from the latest checkpoint"
          disabled={busy || !LEGAL.resume.has(job.state)}
          onClick={() => void act('resume')}
        />
        <ActionButton
          label="Cancel"
          title="Stop the job for good (checkpoints stay)"
          disabled={busy || stopping || !LEGAL.cancel.has(job.state)}
          onClick={() => void act('cancel')}
          warn
        />
      </div>
      {open && <JobDetail job={job} model={model} metrics={metrics} />}
    </li>
  );
}

function JobDetail({
  job,
  model,
  metrics
}: {
  job: IJob;
  model: JobsModel;
  metrics: IMetrics | undefined;
}): JSX.Element {
  const detail = model.detail;
  const shown = Object.entries(metrics ?? {}).filter(
    ([key, value]) =>
      !NOT_METRICS.has(key) && ['number', 'string'].includes(typeof value)
  );
  return (
    <div className="jp-CumulusJob-detail">
      <h3>Latest metrics</h3>
      {shown.length ? (
        <dl className="jp-CumulusJob-metrics">
          {shown.map(([key, value]) => (
            <React.Fragment key={key}>
              <dt>{key}</dt>
              <dd>{formatValue(value)}</dd>
            </React.Fragment>
          ))}
        </dl>
      ) : (
        <p className="jp-CumulusPanel-empty">
          Nothing reported yet (<code>report(loss=...)</code> in the job).
        </p>
      )}
      <MetricsChart records={model.steps(job.id)} />
      <h3>Checkpoints</h3>
      {detail === null ? (
        <p className="jp-CumulusPanel-empty">Loading…</p>
      ) : (
        <CheckpointTable
          job={job}
          model={model}
          checkpoints={detail.checkpoints}
        />
      )}
      <h3>Log</h3>
      <LogTail text={detail === null ? '' : detail.log || '(no output yet)'} />
    </div>
  );
}

/**
 * Each numeric metric against its step, one point per step (the newest run's
 * value: a resume runs the steps after its checkpoint again), each line on
 * its own scale.
 */
function MetricsChart({
  records
}: {
  records: IMetrics[];
}): JSX.Element | null {
  const series = new Map<string, [number, number][]>();
  for (const record of records) {
    const x = record.step as number; // records of `steps()` have a numeric step
    for (const [key, value] of Object.entries(record)) {
      if (
        !NOT_METRICS.has(key) &&
        typeof value === 'number' &&
        isFinite(value)
      ) {
        let points = series.get(key);
        if (points === undefined) {
          points = [];
          series.set(key, points);
        }
        points.push([x, value]);
      }
    }
  }
  const shown = [...series.keys()].sort().slice(0, PALETTE.length);
  if (!shown.length) {
    return null;
  }
  const width = 300;
  const height = 80;
  const pad = 3;
  return (
    <figure className="jp-CumulusJob-chart" style={{ margin: '4px 0' }}>
      <svg
        viewBox={`0 0 ${width} ${height}`}
        width="100%"
        role="img"
        aria-label={`${shown.join(', ')} by step`}
        style={{ background: 'var(--jp-layout-color2)', display: 'block' }}
      >
        {shown.map((name, i) => {
          const points = series.get(name)!;
          const xs = points.map(p => p[0]);
          const ys = points.map(p => p[1]);
          const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
          const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
          const sx = (width - 2 * pad) / (x1 - x0 || 1);
          const sy = (height - 2 * pad) / (y1 - y0 || 1);
          const coords = points
            .map(
              ([x, y]) =>
                `${(pad + (x - x0) * sx).toFixed(1)},${(height - pad - (y - y0) * sy).toFixed(1)}`
            )
            .join(' ');
          return (
            <polyline
              key={name}
              data-metric={name}
              data-points={points.length}
              fill="none"
              stroke={PALETTE[i]}
              strokeWidth={1.5}
              vectorEffect="non-scaling-stroke"
              points={coords}
            >
              <title>
                {name}: {formatValue(ys[ys.length - 1])} at step{' '}
                {xs[xs.length - 1]}
              </title>
            </polyline>
          );
        })}
      </svg>
      <figcaption style={{ fontSize: 'var(--jp-ui-font-size0)' }}>
        {shown.map((name, i) => (
          <span key={name} style={{ color: PALETTE[i], marginRight: '8px' }}>
            {name}
          </span>
        ))}
        by step
      </figcaption>
    </figure>
  );
}

function CheckpointTable({
  job,
  model,
  checkpoints
}: {
  job: IJob;
  model: JobsModel;
  checkpoints: ICheckpoint[];
}): JSX.Element {
  if (!checkpoints.length) {
    return (
      <p className="jp-CumulusPanel-empty">
        No checkpoints yet (<code>Checkpointer.save</code> in the job).
      </p>
    );
  }
  const latest = checkpoints[checkpoints.length - 1].name;
  const resumable = LEGAL.resume.has(job.state);
  const resumeFrom = async (name: string) => {
    try {
      await model.act(job.id, 'resume', { checkpoint: name });
    } catch (error) {
      await showErrorMessage(
        `Cannot resume ${job.name} from ${name}`,
        (error as Error).message
      );
    }
  };
  const remove = async (name: string) => {
    const answer = await showDialog({
      title: `Delete ${name}?`,
      body: `The checkpoint file of ${job.name} is removed from the server.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await model.deleteCheckpoint(job.id, name);
    } catch (error) {
      await showErrorMessage(`Cannot delete ${name}`, (error as Error).message);
    }
  };
  return (
    <ul className="jp-CumulusJob-checkpoints">
      {[...checkpoints].reverse().map(c => {
        // The server keeps the checkpoint a stopped job resumes from.
        const needed = resumable && c.name === latest;
        return (
          <li key={c.name} data-checkpoint={c.name}>
            <div
              className="jp-CumulusJob-checkpointInfo"
              title={metricsTitle(c.metrics)}
            >
              <div className="jp-CumulusJob-checkpointName">
                {c.name}
                {c.name === latest && (
                  <span className="jp-CumulusJob-latest">latest</span>
                )}
              </div>
              <div className="jp-CumulusJob-checkpointFacts">
                epoch {c.epoch} · step {c.step} ·{' '}
                {new Date(c.time * 1000).toLocaleTimeString()} · {bytes(c.size)}
              </div>
            </div>
            <div className="jp-CumulusJob-rowActions">
              <ActionButton
                label="Resume"
                title={
                  resumable
                    ? 'Resume the job from this checkpoint'
                    : 'Only a paused, timed-out or lost job can be resumed'
                }
                disabled={!resumable}
                onClick={() => void resumeFrom(c.name)}
              />
              <ActionButton
                label="Delete"
                title={
                  needed
                    ? 'The job resumes from this checkpoint; resume or cancel the job first'
                    : 'Delete this checkpoint'
                }
                disabled={needed}
                onClick={() => void remove(c.name)}
                warn
              />
            </div>
          </li>
        );
      })}
    </ul>
  );
}

/**
 * The end of a job's log, kept scrolled to its last line as output arrives,
 * unless the user scrolled up to read.
 */
function LogTail({ text }: { text: string }): JSX.Element {
  const ref = React.useRef<HTMLPreElement>(null);
  const atEnd = React.useRef(true);
  React.useLayoutEffect(() => {
    const pre = ref.current;
    if (pre && atEnd.current) {
      pre.scrollTop = pre.scrollHeight;
    }
  }, [text]);
  return (
    <pre
      ref={ref}
      className="jp-CumulusJob-log"
      onScroll={event => {
        const pre = event.currentTarget;
        atEnd.current = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
      }}
    >
      {text}
    </pre>
  );
}

function ActionButton(props: {
  label: string;
  title: string;
  disabled: boolean;
  onClick: () => void;
  warn?: boolean;
}): JSX.Element {
  const warn = props.warn ? ' jp-mod-warn' : '';
  return (
    <button
      className={`jp-Button jp-mod-styled jp-mod-small${warn}`}
      disabled={props.disabled}
      title={props.title}
      onClick={props.onClick}
    >
      {props.label}
    </button>
  );
}

function progressOf(
  metrics: IMetrics | undefined
): { step: number; total: number; fraction: number } | null {
  const step = metrics?.step;
  const total = metrics?.total;
  if (typeof step !== 'number' || typeof total !== 'number' || total <= 0) {
    return null;
  }
  // `report(step=i, total=n)` counts from 0, like the training loop.
  const done = Math.min(total, step + 1);
  return { step: done, total, fraction: done / total };
}

function deviceLabel(job: IJob): string {
  if (job.state === 'queued' || job.device === null) {
    return 'waiting for a device';
  }
  return job.device === 'cpu' ? 'CPU' : `GPU ${job.device}`;
}

/** `1:02:03`, `4:05` or `–`. */
export function clock(seconds: number | null): string {
  if (seconds === null || !isFinite(seconds)) {
    return '–';
  }
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

function percent(fraction: number): string {
  return `${Math.round(fraction * 100)}%`;
}

function bytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value < 10 && unit ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

function formatValue(value: unknown): string {
  if (typeof value === 'number') {
    return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }
  return String(value);
}

function metricsTitle(metrics: { [key: string]: unknown }): string {
  return Object.entries(metrics ?? {})
    .map(([k, v]) => `${k}: ${formatValue(v)}`)
    .join('\n');
}
