/** The chart of a job's metrics in the panel's job detail. */
import React from 'react';

import { IMetrics } from './api';
import { formatValue } from './format';
import { POSITION_FIELDS } from './metrics';

/** Line colours of the metrics chart; one metric each, the first ones by name. */
const PALETTE = ['#1565c0', '#c62828', '#2e7d32', '#6a1b9a', '#ef6c00'];

/**
 * Each numeric metric against its step, one point per step (the newest run's
 * value: a resume runs the steps after its checkpoint again), each line on
 * its own scale.
 */
export function MetricsChart({
  records
}: {
  records: IMetrics[];
}): JSX.Element | null {
  const series = new Map<string, [number, number][]>();
  for (const record of records) {
    const x = record.step as number; // records of `steps()` have a numeric step
    for (const [key, value] of Object.entries(record)) {
      if (
        !POSITION_FIELDS.has(key) &&
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
