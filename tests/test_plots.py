"""Loss-curve plots: the PNGs are real images, the lines hold exactly the logged numbers, and a
missing matplotlib skips the plot with a note."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from engine import plots
from engine.plots import main, plot_run, plot_sweep, read_metrics, run_figure, sweep_figure

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def training_log(steps: int = 12, eval_every: int = 4, start: float = 3.0, lr: float = 1e-3) -> list[dict]:
    """Records as the trainer writes them: one per step, one per validation, a final summary."""
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "epoch": step / steps, "loss": start / step + 0.01 * (step % 3),
                        "lr": lr * min(1.0, step / 3) * (1 - step / (steps + 1)), "grad_norm": 1.0,
                        "tokens_per_second": 100.0})
        if step % eval_every == 0:
            records.append({"step": step, "epoch": step / steps, "eval_loss": start / step + 0.3 + (step == 12),
                            "eval_runtime": 0.1, "eval_samples_per_second": 50.0, "best": step != 12})
    records.append({"step": steps, "summary": {"best_step": 8}})
    return records


def write_log(directory, records) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path, min_width: int) -> None:
    width, height = png_size(path)
    assert width >= min_width and height >= 300
    assert path.stat().st_size > 10_000  # axes, curves and labels, not a blank canvas
    import matplotlib.image
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def line_data(axes) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_run_plot_is_a_png_of_the_logged_curves(tmp_path):
    write_log(tmp_path / "run", training_log())
    path = plot_run(tmp_path / "run")
    assert path == tmp_path / "run" / "loss.png"
    assert_sensible_png(path, min_width=700)
    assert not list((tmp_path / "run").glob(".*.tmp"))  # written atomically, no debris


def test_run_figure_lines_hold_the_logged_steps_losses_and_learning_rates(tmp_path):
    records = training_log()
    write_log(tmp_path, records)
    figure = run_figure(read_metrics(tmp_path / "metrics.jsonl"), "run", plots._figure_class())
    loss_axes, lr_axes = figure.axes
    lines = line_data(loss_axes)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert lines["train loss"] == ([r["step"] for r in train], [r["loss"] for r in train])
    assert lines["validation loss"] == ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    assert line_data(lr_axes)["learning rate"] == ([r["step"] for r in train], [r["lr"] for r in train])
    best = loss_axes.collections[0].get_offsets().tolist()  # the marked best validation point
    assert best == [[8, 3.0 / 8 + 0.3]]


def test_best_marker_is_the_checkpoint_the_trainer_kept_not_merely_the_lowest_loss():
    records = training_log()
    step8 = next(r for r in records if r["step"] == 8 and "eval_loss" in r)
    step8["best"] = False  # lower than step 4, but by less than min_delta
    figure = run_figure(records, "run", plots._figure_class())
    assert figure.axes[0].collections[0].get_offsets().tolist() == [[4, 3.0 / 4 + 0.3]]
    for record in records:
        record.pop("best", None)  # an older log without the flag: the lowest loss
    figure = run_figure(records, "run", plots._figure_class())
    assert figure.axes[0].collections[0].get_offsets().tolist() == [[8, 3.0 / 8 + 0.3]]


def test_sweep_plot_compares_every_run_best_first(tmp_path):
    sweep = tmp_path / "sweep"
    logs = {"lr1e-05_bs8_wd0": training_log(start=4.0), "lr5e-05_bs8_wd0": training_log(start=2.0, steps=8),
            "lr2e-05_bs8_wd0": training_log(start=3.0)}
    for name, records in logs.items():
        write_log(sweep / "runs" / name, records)
    order = ["lr5e-05_bs8_wd0", "lr2e-05_bs8_wd0", "lr1e-05_bs8_wd0"]
    (sweep / "sweep.json").write_text(json.dumps({"best": order[0], "runs": [{"run": n} for n in order]}))

    assert_sensible_png(plot_sweep(sweep), min_width=1000)
    assert (sweep / "sweep.png").is_file()
    figure = sweep_figure(plots.sweep_logs(sweep)[0], order[0], "sweep", plots._figure_class())
    eval_axes, train_axes = figure.axes
    assert [line.get_label() for line in eval_axes.get_lines()] == [f"{order[0]} (best)", *order[1:]]
    for line, name in zip(eval_axes.get_lines(), order):
        evals = [r for r in logs[name] if "eval_loss" in r]
        assert (list(line.get_xdata()), list(line.get_ydata())) == ([r["step"] for r in evals],
                                                                     [r["eval_loss"] for r in evals])
    for line, name in zip(train_axes.get_lines(), order):
        assert list(line.get_ydata()) == [r["loss"] for r in logs[name] if "loss" in r]


def test_cli_picks_run_or_sweep_from_the_directory(tmp_path, capsys):
    write_log(tmp_path / "run", training_log())
    write_log(tmp_path / "sweep" / "runs" / "a", training_log())
    assert main([str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "loss.png").is_file()
    assert main([str(tmp_path / "sweep")]) == 0 and (tmp_path / "sweep" / "sweep.png").is_file()
    assert "sweep.png" in capsys.readouterr().out


def test_missing_matplotlib_skips_the_plot_with_a_note(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / "run", training_log())
    write_log(tmp_path / "sweep" / "runs" / "a", training_log())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_run(tmp_path / "run") is None
    assert plot_sweep(tmp_path / "sweep") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))


def test_log_without_training_steps_draws_nothing(tmp_path, capsys):
    write_log(tmp_path, [{"step": 0, "summary": {}}])
    assert plot_run(tmp_path) is None
    assert "no training steps" in capsys.readouterr().err


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "metrics.jsonl: not found"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n'), "line 2"),
    (lambda d: (d / "metrics.jsonl").write_text('{"loss": 2.0}\n'), "integer \"step\""),
], ids=["missing", "bad-json", "no-step"])
def test_unreadable_logs_are_cli_errors_naming_file_and_line(tmp_path, capsys, setup, fragment):
    setup(tmp_path)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err
