/** The panel's small action button: a job's Pause / Resume / Cancel, a checkpoint's. */
import React from 'react';

/** A button; `warn` styles it as one that stops or deletes something. */
export function ActionButton(props: {
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
