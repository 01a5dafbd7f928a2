/**
 * The REST API of the cumulus server extension, as the panel uses it.
 *
 * Every request goes through `ServerConnection`, so the server's base URL,
 * the token and the XSRF cookie are handled the way JupyterLab handles them
 * for its own requests.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** The states of a job: `JobState` of cumulus_jupyter/states.py. */
export type JobState =
  | 'queued'
  | 'running'
  | 'pausing'
  | 'paused'
  | 'completed'
  | 'failed'
  | 'cancelled'
  | 'timed_out'
  | 'lost';

/**
 * What a user can ask of a job, in button order: `Action` of
 * cumulus_jupyter/states.py.
 */
export type JobAction = 'pause' | 'resume' | 'cancel' | 'delete';

/** The fields of a job record the panel knows (docs/rest-api.md has them all). */
export interface IJob {
  id: string;
  name: string;
  owner: string;
  state: JobState;
  created: number;
  gpu_memory: number;
  duration: number | null;
  device: string | null;
  /** How many processes (ranks) run the job's function. */
  nprocs: number;
  /** The devices its current or last run got, one per rank on a GPU host. */
  devices: string[];
  /** With the Ray backend: the node of its current or last run. */
  node?: string | null;
  message: string;
  elapsed: number | null;
  run: number;
  /** How many times a run that dies without being asked is started again. */
  max_restarts?: number;
  /** Each such restart: the run that was lost, when (seconds), and why. */
  restarts?: { run: number; time: number; cause: string }[];
  resume_checkpoint: string | null;
  /**
   * What the user may do to this job now (the server's `actions()` of
   * cumulus_jupyter/states.py): each button is enabled exactly when its
   * action is here. A job being cancelled has none.
   */
  actions: JobAction[];
}

/** One device's shares: how much is taken, and by which jobs. */
export interface IGpu {
  device: string;
  used: number;
  jobs: { [jobId: string]: number };
}

/** A committed checkpoint of a job. */
export interface ICheckpoint {
  name: string;
  epoch: number;
  step: number;
  time: number;
  size: number;
  metrics: { [key: string]: unknown };
  /** "dcp" for a checkpoint saved by the ranks of a job of several ranks. */
  format?: string;
  /** How many ranks saved it (sharded checkpoints only). */
  ranks?: number;
}

/** One `report()` call of a job. */
export interface IMetrics {
  [key: string]: unknown;
}

/** A chunk of a job's log. */
export interface ILogChunk {
  offset: number;
  next_offset: number;
  size: number;
  data: string;
  running: boolean;
}

/**
 * States in which a job's process may still change something: the model
 * keeps fetching these jobs' metrics. `ACTIVE` of cumulus_jupyter/states.py
 * is the source; tests/test_contracts.py checks that this copy agrees.
 */
export const ACTIVE: ReadonlySet<JobState> = new Set<JobState>([
  'queued',
  'running',
  'pausing'
]);

/** An error answered by the server (or a failure to reach it), readable as is. */
export class CumulusError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string
  ) {
    super(message);
    this.name = 'CumulusError';
  }
}

/**
 * Call `{base_url}cumulus/api/{endpoint}` and return its JSON body.
 *
 * A non-2xx answer becomes a `CumulusError` carrying the server's own
 * `message` (for example "job 3f9a1c0b7d2e is completed; only a running job
 * can be paused"), so the user reads what the server said.
 */
export async function requestAPI<T>(
  endpoint: string,
  init: RequestInit = {},
  query: { [key: string]: string | number } = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  let url = URLExt.join(settings.baseUrl, 'cumulus', 'api', endpoint);
  if (Object.keys(query).length) {
    url += URLExt.objectToQueryString(query);
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new CumulusError(
      `Cannot reach the Jupyter server: ${(error as Error).message ?? error}`,
      0,
      'network'
    );
  }
  const text = await response.text();
  let body: any = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    const message =
      body && typeof body.message === 'string'
        ? body.message
        : `${response.status} ${response.statusText || 'error'}`;
    throw new CumulusError(
      message,
      response.status,
      (body && body.error) || 'error'
    );
  }
  return body as T;
}

/** The path of a job's route, with its parts escaped. */
export function jobPath(id: string, ...rest: string[]): string {
  return ['jobs', id, ...rest].map(encodeURIComponent).join('/');
}
