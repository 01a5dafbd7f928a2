/**
 * The "Cumulus jobs" side panel: every job of the server, its controls, its
 * checkpoints, log and metrics, and the GPU shares.
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import React from 'react';

import { ACTIVE, IGpu, IJob, IMetrics, JobAction } from './api';
import { ActionButton } from './button';
import { MetricsChart } from './chart';
import { CheckpointTable } from './checkpoints';
import { EventStream } from './events';
import { clock, formatValue, percent } from './format';
import { cumulusIcon } from './icon';
import { POSITION_FIELDS } from './metrics';
import { JobsModel } from './model';

export class JobsPanel extends ReactWidget {
  /** `events`: the server's event log; the panel then reads only the jobs that changed. */
  constructor(events?: EventStream) {
    super();
    this.id = 'cumulus-jobs';
    this.title.icon = cumulusIcon;
    this.title.caption = 'Cumulus jobs';
    this.addClass('jp-CumulusPanel');
    this.model = new JobsModel({
      isVisible: () => this.isVisible,
      events
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
  const act = async (action: Exclude<JobAction, 'delete'>) => {
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
  // Exactly what the server says may be done now (none while cancelling).
  const allowed = (action: JobAction) => !busy && job.actions.includes(action);
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
            <span title="the device(s) it runs on, and its share of each one's memory">
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
        {job.restarts && job.restarts.length > 0 && (
          <div
            className="jp-CumulusJob-restarts"
            title={job.restarts
              .map(
                r =>
                  `run ${r.run} lost at ${new Date(r.time * 1000).toLocaleTimeString()}: ${r.cause}`
              )
              .join('\n')}
          >
            restarted {job.restarts.length} of{' '}
            {job.max_restarts ?? job.restarts.length} times after a lost run
          </div>
        )}
      </div>
      <div className="jp-CumulusJob-actions">
        <ActionButton
          label="Pause"
          title="Save a checkpoint at the next batch and free the GPU"
          disabled={!allowed('pause')}
          onClick={() => void act('pause')}
        />
        <ActionButton
          label="Resume"
          title="Continue from the latest checkpoint"
          disabled={!allowed('resume')}
          onClick={() => void act('resume')}
        />
        <ActionButton
          label="Cancel"
          title="Stop the job for good (checkpoints stay)"
          disabled={!allowed('cancel')}
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
      !POSITION_FIELDS.has(key) && ['number', 'string'].includes(typeof value)
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
  const ranks = job.nprocs > 1 ? ` · ${job.nprocs} ranks` : '';
  if (job.state === 'queued' || job.device === null) {
    return `waiting for ${job.nprocs > 1 ? `${job.nprocs} devices` : 'a device'}`;
  }
  const devices = job.devices?.length ? job.devices : [job.device];
  // On a Ray cluster: the node Ray placed the run on.
  const node = job.node ? ` · node ${job.node}` : '';
  if (devices.every(d => d === 'cpu')) {
    return `CPU${ranks}${node}`;
  }
  return `GPU${devices.length > 1 ? 's' : ''} ${devices.join(', ')}${ranks}${node}`;
}
