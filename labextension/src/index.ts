/**
 * cumulus-jupyter's JupyterLab extension: the "Cumulus jobs" side panel, the
 * command that opens it, and notifications when a job ends or stops.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { cumulusIcon } from './icon';
import { sharedEvents } from './events';
import { DEFAULT_NOTIFY_STATES, JobNotifier } from './notify';
import { JobsPanel } from './panel';

export { CumulusError, requestAPI } from './api';
export { JobsModel } from './model';
export { JobsPanel } from './panel';

/** Command ids. */
export namespace CommandIDs {
  export const openPanel = 'cumulus:open-jobs-panel';
  export const refresh = 'cumulus:refresh-jobs';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'cumulus-jupyter:jobs-panel',
  description: 'A side panel with every cumulus job of the server.',
  autoStart: true,
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    const panel = new JobsPanel(sharedEvents());
    app.shell.add(panel, 'left', { rank: 700 });
    if (restorer) {
      // Reopens the panel if it was open when the page was left.
      restorer.add(panel, 'cumulus-jobs');
    }

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Open the Cumulus Jobs Panel',
      caption: 'Every training job of this server, with pause and resume',
      icon: cumulusIcon,
      // `job`: open that job's details too (a notification's "Show").
      execute: args => {
        app.shell.activateById(panel.id);
        if (typeof args.job === 'string' && args.job) {
          panel.model.select(args.job);
        }
      }
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh Cumulus Jobs',
      execute: () => panel.model.refresh()
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.openPanel, category: 'Cumulus' });
      palette.addItem({ command: CommandIDs.refresh, category: 'Cumulus' });
    }
  }
};

const notifications: JupyterFrontEndPlugin<void> = {
  id: 'cumulus-jupyter:notifications',
  description:
    'Notifications when a cumulus job completes, fails, pauses, times out or is lost.',
  autoStart: true,
  optional: [ISettingRegistry],
  activate: (app: JupyterFrontEnd, registry: ISettingRegistry | null) => {
    const notifier = new JobNotifier({
      events: sharedEvents(),
      show: job => void app.commands.execute(CommandIDs.openPanel, { job })
    });
    if (registry) {
      const apply = (settings: ISettingRegistry.ISettings) => {
        notifier.enabled = settings.get('enabled').composite !== false;
        const states = settings.get('states').composite;
        notifier.states = new Set(
          Array.isArray(states) ? (states as string[]) : DEFAULT_NOTIFY_STATES
        );
      };
      registry
        .load(notifications.id)
        .then(settings => {
          apply(settings);
          settings.changed.connect(apply);
        })
        .catch(reason =>
          console.warn(
            'cumulus-jupyter: notification settings not loaded',
            reason
          )
        );
    }
  }
};

export default [plugin, notifications];
