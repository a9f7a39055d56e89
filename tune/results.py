"""What a search found: one row per trial (Parquet and CSV) and a plot of the metric against alpha, delta
and the noise range.

A row holds the trial's searched values under their config field names (plus the derived
``sampler.noise_high``), how far it got (``epochs_done``, ``stopped_early`` when ASHA cut it short), the
metric at its last epoch and at its best epoch, the checkpoint of that best epoch, and whether it is the
centre (the base config's own values: the paper's for the paper presets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from tune.space import NOISE_WIDTH, SearchSpace
from tune.trial import EPOCHS_DONE


@dataclass
class TrialRow:
    trial_id: str
    status: str  # TERMINATED or ERROR
    values: dict[str, Any]  # config field -> value (searched, plus derived noise_high)
    epochs_done: int
    stopped_early: bool
    metric_last: float
    metric_best: float
    best_epoch: int
    best_checkpoint: str | None
    is_centre: bool
    time_total_s: float
    error: str | None = None


def _finite(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_line(error: BaseException) -> str:
    """The last line of a trial's error (Ray wraps the cause in tracebacks; the cause comes last)."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def trial_rows(results: Any, space: SearchSpace, metric: str, mode: str, epochs: int) -> list[TrialRow]:
    """One row per trial of a ``ray.tune.ResultGrid``, in trial-id order."""
    centre = space.centre()
    rows: list[TrialRow] = []
    for result in results:
        history = result.metrics_dataframe
        last = result.metrics or {}
        trial_id = str(last.get("trial_id") or Path(result.path).name)
        sampled = {name: result.config[name] for name in space.names if name in result.config}
        values = dict(space.overrides(sampled)) if len(sampled) == len(space.names) else dict(sampled)
        if NOISE_WIDTH in sampled:
            values[NOISE_WIDTH] = sampled[NOISE_WIDTH]
        best_value, best_epoch, best_checkpoint = float("nan"), -1, None
        if history is not None and metric in getattr(history, "columns", ()):
            scores = history[metric].astype(float)
            if scores.notna().any():
                index = scores.idxmax() if mode == "max" else scores.idxmin()
                best_value = float(scores[index])
                best_epoch = int(history.loc[index, "epoch"]) if "epoch" in history.columns else -1
                if "checkpoint_path" in history.columns:
                    best_checkpoint = history.loc[index, "checkpoint_path"]
        epochs_done = int(last.get(EPOCHS_DONE, 0) or 0)
        rows.append(TrialRow(
            trial_id=trial_id,
            status="ERROR" if result.error is not None else "TERMINATED",
            values=values,
            epochs_done=epochs_done,
            stopped_early=result.error is None and epochs_done < epochs,
            metric_last=_finite(last.get(metric)),
            metric_best=best_value,
            best_epoch=best_epoch,
            best_checkpoint=str(best_checkpoint) if isinstance(best_checkpoint, str) else None,
            is_centre=all(sampled.get(k) == v for k, v in centre.items()),
            time_total_s=_finite(last.get("time_total_s")),
            error=None if result.error is None else _error_line(result.error),
        ))
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best metric at any of its epochs (the checkpoint that gets registered).

    On a tie the centre wins: a searched config replaces the base config's values only if strictly better."""
    scored = [r for r in rows if not math.isnan(r.metric_best)]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: (sign * r.metric_best, r.is_centre))


def rows_table(rows: Sequence[TrialRow], metric: str, mlflow_runs: dict[str, str] | None = None) -> pa.Table:
    value_names = sorted({name for r in rows for name in r.values})
    columns: dict[str, list[Any]] = {
        "trial_id": [r.trial_id for r in rows],
        "status": [r.status for r in rows],
        "is_centre": [r.is_centre for r in rows],
        "epochs_done": [r.epochs_done for r in rows],
        "stopped_early": [r.stopped_early for r in rows],
    }
    for name in value_names:
        columns[name] = [_as_float(r.values.get(name)) for r in rows]
    columns |= {
        f"{metric}_last": [r.metric_last for r in rows],
        f"{metric}_best": [r.metric_best for r in rows],
        "best_epoch": [r.best_epoch for r in rows],
        "best_checkpoint": [r.best_checkpoint for r in rows],
        "time_total_s": [r.time_total_s for r in rows],
        "mlflow_run_id": [(mlflow_runs or {}).get(r.trial_id) for r in rows],
        "error": [r.error for r in rows],
    }
    return pa.table(columns)


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def write_table(table: pa.Table, out_dir: Path, stem: str = "trials") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet_path, csv_path = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
    pq.write_table(table, parquet_path)
    pa_csv.write_csv(table, csv_path)
    return parquet_path, csv_path


def plot_trials(rows: Sequence[TrialRow], metric: str, path: Path, title: str) -> Path:
    """Metric (best epoch) against alpha, delta (log axis) and the noise range, one point per trial.

    Trials ASHA stopped are hollow; the centre (the base config's values) is a star. The noise range of a
    trial is drawn as a bar from its low to its high end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss.alpha", "alpha (joint-loss decay)", False), ("loss.delta", "delta (weight of L_bb + L_s)", True),
              ("sampler.noise_low", "noise range [low, high]", False)]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (name, label, log_x) in zip(axes, panels, strict=True):
        for r in rows:
            if math.isnan(r.metric_best) or name not in r.values:
                continue
            face = "none" if r.stopped_early else "tab:blue"
            marker, size = ("*", 160) if r.is_centre else ("o", 50)
            if name == "sampler.noise_low":
                low, high = r.values["sampler.noise_low"], r.values.get("sampler.noise_high")
                if high is not None:
                    ax.plot([low, high], [r.metric_best] * 2, color="tab:blue", alpha=0.5, lw=2)
                ax.scatter([low], [r.metric_best], s=size, marker=marker, facecolors=face, edgecolors="tab:blue")
            else:
                ax.scatter([r.values[name]], [r.metric_best], s=size, marker=marker, facecolors=face,
                           edgecolors="tab:blue")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (best epoch)")
    figure.suptitle(f"{title}  (star: centre = base config; hollow: stopped early by ASHA)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_lines(rows: Sequence[TrialRow], metric: str) -> list[str]:
    """A markdown table of the trials, for the terminal and the report."""
    names = sorted({name for r in rows for name in r.values if name != NOISE_WIDTH})
    header = ["trial", "status", "epochs", *names, f"{metric} best", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        note = ", ".join(x for x in ("centre" if r.is_centre else "", "stopped early" if r.stopped_early else "",
                                      (r.error or "")[:60]) if x)
        cells = [r.trial_id, r.status, str(r.epochs_done)] + [f"{r.values.get(n, float('nan')):.4g}" for n in names]
        cells += [f"{r.metric_best:.4g}", note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
