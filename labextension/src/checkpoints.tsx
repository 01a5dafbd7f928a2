/** A job's checkpoints in the panel: resume the job from one, or delete one. */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import React from 'react';

import { ICheckpoint, IJob } from './api';
import { ActionButton } from './button';
import { bytes, metricsTitle } from './format';
import { JobsModel } from './model';

/**
 * The checkpoints, newest first. Resume is enabled when the job's `actions`
 * hold `resume`; then its newest checkpoint cannot be deleted.
 */
export function CheckpointTable({
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
  const resumable = job.actions.includes('resume');
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
        // The server keeps the newest checkpoint of a job that can resume.
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
                {c.ranks ? ` · ${c.ranks} ranks` : ''}
              </div>
            </div>
            <div className="jp-CumulusJob-rowActions">
              <ActionButton
                label="Resume"
                title={
                  resumable
                    ? 'Resume the job from this checkpoint'
                    : 'The job cannot be resumed now'
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
