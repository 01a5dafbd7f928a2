/**
 * cumulus-jupyter's JupyterLab extension: the "Cumulus jobs" side panel and
 * the command that opens it.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';

import { cumulusIcon } from './icon';
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
    const panel = new JobsPanel();
    app.shell.add(panel, 'left', { rank: 700 });
    if (restorer) {
      // Reopens the panel if it was open when the page was left.
      restorer.add(panel, 'cumulus-jobs');
    }

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Open the Cumulus Jobs Panel',
      caption: 'Every training job of this server, with pause and resume',
      icon: cumulusIcon,
      execute: () => app.shell.activateById(panel.id)
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

export default plugin;
