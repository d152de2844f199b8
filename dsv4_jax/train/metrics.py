"""Metrics sinks: JSONL (one object per line), TensorBoard, and the `dsv4 plot` curves.

Records: {"step", "kind": "train" | "eval", numbers...} and {"step", "kind": "event", "event": "spike" |
"anticipation_off", ...} (loss spikes and their recovery, loop.py). After a rollback the steps it
undid are written again: the last record of a step is the one that counts (`dsv4 plot` shows the
undone ones in grey, the spikes, the rollbacks and the anticipatory-routing periods).
"""

from __future__ import annotations

import json
import os


class NoMetrics:
  """The MetricsWriter of a process other than process 0: writes nothing."""
  dropped = 0

  def write(self, step: int, kind: str, values: dict) -> None:
    pass

  def event(self, step: int, values: dict) -> None:
    pass

  def close(self) -> None:
    pass


class MetricsWriter:
  """Appends metrics to `<run_dir>/metrics.jsonl` and TensorBoard event files in `<run_dir>/tb`.

  `resumed_at`: the step a resumed run continues from. Records of later steps (written after that
  checkpoint by the interrupted run, and about to be written again) are dropped from metrics.jsonl,
  as is an incomplete last line, and TensorBoard purges them (`purge_step`); `self.dropped` counts them.
  """

  def __init__(self, run_dir: str, tensorboard: bool = True, *, resumed_at: int | None = None):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    self.dropped = _drop_after(path, resumed_at) if resumed_at is not None else 0
    self.file = open(path, "a")
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"),
                              purge_step=None if resumed_at is None else resumed_at + 1)

  def write(self, step: int, kind: str, values: dict) -> None:
    record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in values.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def event(self, step: int, values: dict) -> None:
    """A record of kind "event" (a loss spike, the end of anticipatory routing, ...): `values` as given
    (JSON: numbers, strings, None); TensorBoard gets its "action" as text under "events"."""
    self.file.write(json.dumps({"step": int(step), "kind": "event", **values}) + "\n")
    self.file.flush()
    if self.tb is not None:
      self.tb.add_text("events", f"{values.get('event', '')}: {values.get('action', '')}", int(step))

  def close(self) -> None:
    self.file.close()
    if self.tb is not None:
      self.tb.close()


def _drop_after(path: str, step: int) -> int:
  """Rewrites the JSONL file `path` without records after `step` (and unparsable lines); -> lines dropped."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass
  if len(kept) < len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return len(lines) - len(kept)


def last_record(run_dir: str, kind: str = "train") -> dict | None:
  """The last record of `kind` in `<run_dir>/metrics.jsonl`, or None."""
  try:
    records = read_metrics(run_dir)
  except (FileNotFoundError, ValueError):
    return None
  return next((r for r in reversed(records) if r.get("kind") == kind), None)


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a training run directory?)")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: str | None = None) -> str:
  """Writes loss and throughput curves of a run to a PNG; returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(run_dir)
  train, abandoned = _final_trajectory([r for r in records if r["kind"] == "train"])
  val, _ = _final_trajectory([r for r in records if r["kind"] == "eval"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (nats/token)")
  _mark_stability(axes[0], records, abandoned)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("nats per token")
  if val:
    axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    twin = axes[0].twinx()
    twin.plot([r["step"] for r in val], [r["bits_per_byte"] for r in val], "s--", color="tab:red",
              label="validation bits/byte")
    twin.set_ylabel("bits per byte")
    lines = axes[0].get_lines() + twin.get_lines()   # one legend for both y axes
    axes[0].legend(lines, [line.get_label() for line in lines], loc="upper right")
  else:
    axes[0].legend()
  axes[1].plot([r["step"] for r in train], [r.get("tokens_per_second", 0) for r in train])
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("tokens / s")
  fig.tight_layout()
  out = out or os.path.join(run_dir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def _final_trajectory(records: list[dict]) -> tuple[list[dict], list[dict]]:
  """Records in file order -> (the last record of each step, by step; the records a rollback
  abandoned: those a later record of the same step replaced)."""
  last = {}
  for i, r in enumerate(records):
    last[r["step"]] = i
  kept = sorted((records[i] for i in last.values()), key=lambda r: r["step"])
  return kept, [r for i, r in enumerate(records) if last[r["step"]] != i]


def stability_periods(records: list[dict]) -> list[dict]:
  """The loss spikes of a run's records (metrics.jsonl) with what followed: for each "spike" event
  {"step", "loss", "rollback_to", "active": (first, last) steps routed anticipatorily, or None}.
  A period ends at its "anticipation_off" event, at the next spike, or at the run's last record."""
  events = [r for r in records if r.get("kind") == "event"]
  last_step = max((r["step"] for r in records), default=0)
  spikes = []
  for i, e in enumerate(events):
    if e.get("event") != "spike":
      continue
    active = None
    if e.get("anticipation_steps"):
      end = next((f["step"] for f in events[i + 1:] if f.get("event") in ("anticipation_off", "spike")), last_step)
      active = (e["rollback_to"] + 1, end)
    spikes.append({"step": e["step"], "loss": e.get("loss"), "rollback_to": e.get("rollback_to"), "active": active})
  return spikes


def _mark_stability(ax, records: list[dict], abandoned: list[dict]) -> None:
  """Loss spikes (x), their rollbacks (dotted line at the step rolled back to), the abandoned steps
  (grey) and the anticipatory-routing periods (shaded) on the loss axes."""
  if abandoned:
    ax.plot([r["step"] for r in abandoned], [r["loss"] for r in abandoned], ".", color="0.6", markersize=3,
            label="steps undone by a rollback")
  for i, spike in enumerate(stability_periods(records)):
    ax.plot([spike["step"]], [spike["loss"]], "x", color="tab:red", markersize=9, mew=2,
            label="loss spike" if i == 0 else None)
    if spike["rollback_to"] is not None:
      ax.axvline(spike["rollback_to"], color="tab:red", linestyle=":", linewidth=1,
                 label="rolled back to" if i == 0 else None)
    if spike["active"] is not None:
      ax.axvspan(spike["active"][0], spike["active"][1], color="tab:orange", alpha=0.15,
                 label="anticipatory routing" if i == 0 else None)
