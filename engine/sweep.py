"""Grid sweeps over learning rate, batch size and weight decay, as the seed write-up tuned them.

Each combination trains as its own run under OUTPUT/runs/NAME; a table sorted by best
validation loss is printed and written to OUTPUT/sweep.json, and the best run's `best/`
checkpoint is copied to OUTPUT/best so evaluate.py finds it with no flags.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.checkpointing import RunDirError
from models.atomic import atomic_directory, atomic_write_text


def grid(lrs: list[float], batch_sizes: list[int], weight_decays: list[float]) -> list[dict]:
    return [{"lr": lr, "batch_size": bs, "weight_decay": wd}
            for lr, bs, wd in itertools.product(lrs, batch_sizes, weight_decays)]


def run_name(point: dict) -> str:
    return f"lr{point['lr']:g}_bs{point['batch_size']}_wd{point['weight_decay']:g}"


def format_table(rows: list[dict]) -> str:
    header = f"{'run':<28} {'lr':>9} {'batch':>5} {'wd':>7} {'best val loss':>13} {'step':>6} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "failed"
        lines.append(f"{r['run']:<28} {r['lr']:>9g} {r['batch_size']:>5} {r['weight_decay']:>7g} {loss:>13} "
                     f"{r['best_step'] if r['best_step'] is not None else '-':>6} {r['train_runtime'] or 0:>8.1f}")
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace, points: list[dict],
              train_one: Callable[[argparse.Namespace, Path, bool], dict]) -> list[dict]:
    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise RunDirError(f"{output} already holds results; pass --overwrite or choose another --output-dir")
    rows = []
    for i, point in enumerate(points, 1):
        name = run_name(point)
        print(f"=== sweep run {i}/{len(points)}: {name} ===")
        run_args = copy.copy(args)
        vars(run_args).update(point)
        summary = train_one(run_args, output / "runs" / name, False)
        rows.append({"run": name, **point, "eval_loss": summary["eval_loss"], "best_step": summary["best_step"],
                     "train_runtime": summary["train_runtime"]})
    rows.sort(key=lambda r: (r["eval_loss"] is None, r["eval_loss"] if r["eval_loss"] is not None else 0.0))
    print(format_table(rows))
    best = rows[0]
    with atomic_directory(output / "best") as tmp:
        shutil.copytree(output / "runs" / best["run"] / "best", tmp, dirs_exist_ok=True)
    if not args.keep_all_runs:  # the metrics logs stay, for the comparison figure
        for row in rows[1:]:
            for checkpoint in ("best", "last"):
                shutil.rmtree(output / "runs" / row["run"] / checkpoint, ignore_errors=True)
    atomic_write_text(output / "sweep.json", json.dumps({"best": best["run"], "runs": rows}, indent=2) + "\n")
    print(f"best run: {best['run']} (val loss {best['eval_loss']:.4f}); its checkpoint is at {output / 'best'}")
    return rows
