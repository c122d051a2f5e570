"""Loss curves: a run's train and validation loss and learning rate, and a sweep's runs side by side.

    python -m engine.plots RUN_DIR      # writes RUN_DIR/loss.png from RUN_DIR/metrics.jsonl
    python -m engine.plots SWEEP_DIR    # writes SWEEP_DIR/sweep.png from SWEEP_DIR/runs/*/metrics.jsonl

matplotlib is an optional extra, imported only here and only when a plot is asked for; without
it the plot is skipped with a note. Figures are drawn on the Agg canvas directly (no pyplot), so
plotting never needs a display and never touches pyplot's global state in the caller's process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.atomic import atomic_write

METRICS = "metrics.jsonl"
RUN_PLOT = "loss.png"
SWEEP_PLOT = "sweep.png"
SWEEP_FILE = "sweep.json"
NO_MATPLOTLIB = "note: matplotlib is not installed, so no loss plot was drawn (pip install matplotlib)"


class PlotError(ValueError):
    """A metrics log or sweep directory that cannot be plotted."""


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise PlotError(f"{path}: not found; a run directory holds {METRICS}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}, line {number}: expected an object with an integer \"step\"")
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`."""
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def best_eval(records: list[dict]) -> tuple[int, float]:
    """The validation the trainer kept as best/ (its last `"best": true`; with min_delta that need not be
    the lowest loss), or the lowest loss in logs without the flag."""
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    flagged = [r for r in evals if r.get("best") is True]
    best = flagged[-1] if flagged else min(evals, key=lambda r: r["eval_loss"])
    return best["step"], float(best["eval_loss"])


def _figure_class():
    """matplotlib's Figure with an Agg canvas, or None when matplotlib is absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def make(**kwargs):
        figure = Figure(**kwargs)
        FigureCanvasAgg(figure)
        return figure
    return make


def run_figure(records: list[dict], title: str, make_figure):
    """Top: train loss per step and validation loss at each evaluation (best marked). Bottom: learning rate."""
    figure = make_figure(figsize=(8, 6), constrained_layout=True)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps, losses = series(records, "loss")
    loss_axes.plot(steps, losses, color="tab:blue", linewidth=1, alpha=0.8, label="train loss")
    eval_steps, eval_losses = series(records, "eval_loss")
    if eval_steps:
        loss_axes.plot(eval_steps, eval_losses, color="tab:orange", marker="o", markersize=4, label="validation loss")
        step, value = best_eval(records)
        loss_axes.scatter([step], [value], s=80, facecolors="none", edgecolors="tab:red", zorder=3,
                          label=f"best {value:.4f} @ step {step}")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title(title)
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    lr_steps, lrs = series(records, "lr")
    lr_axes.plot(lr_steps, lrs, color="tab:green", linewidth=1, label="learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.set_ylabel("learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_axes.grid(alpha=0.3)
    return figure


def sweep_figure(logs: dict[str, list[dict]], best: str | None, title: str, make_figure):
    """Left: each run's validation loss per step. Right: each run's train loss. One colour per run."""
    figure = make_figure(figsize=(12, 5), constrained_layout=True)
    eval_axes, train_axes = figure.subplots(1, 2, sharey=True)
    for index, (name, records) in enumerate(logs.items()):
        color = f"C{index % 10}"
        label = f"{name} (best)" if name == best else name
        eval_axes.plot(*series(records, "eval_loss"), color=color, marker="o", markersize=3,
                       linewidth=2.5 if name == best else 1.2, label=label)
        train_axes.plot(*series(records, "loss"), color=color, linewidth=1, alpha=0.8, label=label)
    for axes, what in ((eval_axes, "validation loss"), (train_axes, "train loss")):
        axes.set_title(what)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
    eval_axes.set_ylabel("loss")
    eval_axes.legend(fontsize="small")
    figure.suptitle(title)
    return figure


def _save(figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def plot_run(run_dir: str | Path) -> Path | None:
    """Draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl; None (with a note) without matplotlib or data."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS)
    make_figure = _figure_class()
    if make_figure is None:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return None
    if not series(records, "loss")[0]:
        print(f"note: {run_dir / METRICS} holds no training steps yet; no loss plot drawn", file=sys.stderr)
        return None
    return _save(run_figure(records, run_dir.resolve().name, make_figure), run_dir / RUN_PLOT)


def sweep_logs(sweep_dir: Path) -> tuple[dict[str, list[dict]], str | None]:
    """Each run's metrics, in sweep.json's order (best first) when there is one, with the best run's name."""
    runs_dir = sweep_dir / "runs"
    names, best = sorted(p.name for p in runs_dir.glob("*") if (p / METRICS).is_file()), None
    if (sweep_dir / SWEEP_FILE).is_file():
        try:
            summary = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
            ranked = [row["run"] for row in summary["runs"]]
            best = summary.get("best")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise PlotError(f"{sweep_dir / SWEEP_FILE}: not a sweep summary ({type(exc).__name__}: {exc})") from None
        names = [n for n in ranked if n in names] + [n for n in names if n not in ranked]
    if not names:
        raise PlotError(f"{sweep_dir}: no runs/NAME/{METRICS} to compare; is this a sweep's output directory?")
    return {name: read_metrics(runs_dir / name / METRICS) for name in names}, best


def plot_sweep(sweep_dir: str | Path) -> Path | None:
    """Draw SWEEP_DIR/sweep.png comparing the runs; None (with a note) without matplotlib."""
    sweep_dir = Path(sweep_dir)
    logs, best = sweep_logs(sweep_dir)
    make_figure = _figure_class()
    if make_figure is None:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return None
    title = f"{sweep_dir.resolve().name}: {len(logs)} runs compared"
    return _save(sweep_figure(logs, best, title, make_figure), sweep_dir / SWEEP_PLOT)


def is_sweep(directory: Path) -> bool:
    return (directory / SWEEP_FILE).is_file() or any((directory / "runs").glob(f"*/{METRICS}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a run directory (with metrics.jsonl) or a sweep directory (with runs/)")
    args = p.parse_args(argv)
    directory = Path(args.directory)
    try:
        if not directory.is_dir():
            raise PlotError(f"{directory}: no such directory")
        path = plot_sweep(directory) if is_sweep(directory) else plot_run(directory)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
