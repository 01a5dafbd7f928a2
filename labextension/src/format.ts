/** How the panel writes durations, shares, sizes and metric values. */

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

export function percent(fraction: number): string {
  return `${Math.round(fraction * 100)}%`;
}

export function bytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value < 10 && unit ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

export function formatValue(value: unknown): string {
  if (typeof value === 'number') {
    return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }
  return String(value);
}

export function metricsTitle(metrics: { [key: string]: unknown }): string {
  return Object.entries(metrics ?? {})
    .map(([k, v]) => `${k}: ${formatValue(v)}`)
    .join('\n');
}
