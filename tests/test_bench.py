"""The benchmark harness runs both sides on tiny shapes and reports sane, comparable numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.report import median_process

ROOT = Path(__file__).resolve().parents[1]


def run_quick(cases: str, tmp_path: Path, *extra: str) -> tuple[dict[str, dict], str]:
    """(results by case, the printed report) of `bench.run --quick --cases CASES [EXTRA...]`."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--cases", cases, "--json", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {r["case"]: r for r in json.loads(out.read_text())["results"]}, done.stdout


def test_quick_benchmark_reports_both_sides_with_positive_throughput(tmp_path):
    results, table = run_quick("lora_bf16,beam4", tmp_path)
    assert set(results) == {"lora_bf16", "beam4"}
    for r in results.values():
        ours, theirs = r["sides"]["ours"], r["sides"]["theirs"]
        for side in (ours, theirs):
            assert side["samples_per_s"] > 0 and side["tokens_per_s"] > side["samples_per_s"]
            assert side["peak_mb"] is None or side["peak_mb"] >= 0
        # only the training case keeps state (optimizer moments) between iterations
        steady = [side["steady_peak_mb"] for side in (ours, theirs)]
        if r["case"] == "lora_bf16":
            assert all(mb is None or mb >= 0 for mb in steady)
            for side in (ours, theirs):  # the optimizer's moments outlive every step of a run
                assert side["state_mb"] > 0
                if side["peak_mb"] is not None:
                    assert side["run_peak_mb"] == max(side["peak_mb"], side["steady_peak_mb"] + side["state_mb"])
        else:
            assert steady == [None, None]
            assert ours["run_peak_mb"] is None and "run_mem_ratio" not in r
        assert r["ratio"] == ours["samples_per_s"] / theirs["samples_per_s"]
        assert 0 < r["ours_frac"] < 1.5  # analytic FLOPs over the measured matmul peak
    # same weights, same settings: beam search must pick the same tokens on both sides
    assert results["beam4"]["checks"]["same_output"] is True
    assert "| lora_bf16 |" in table and "| beam4 |" in table and "Targets" in table


def test_lora_step_at_train_py_batch_runs_our_lm_head_over_a_few_rows_at_a_time(tmp_path):
    from models.bart import HEAD_CHUNK_ROWS

    results, table = run_quick("lora_bf16_long", tmp_path)
    result = results["lora_bf16_long"]
    assert "train.py's batch (8 x 64/64 tokens)" in result["title"]
    assert all(side["samples_per_s"] > 0 for side in result["sides"].values())
    checks = result["checks"]
    assert checks["target_rows"] == 8 * 64 > HEAD_CHUNK_ROWS >= checks["our_largest_head_rows"]
    assert "| lora_bf16_long |" in table


def test_memory_counts_state_an_iteration_creates_only_in_the_first_pass():
    from bench.cases import Setup, Side, Work, measure

    kept_mib, temporary_mib = 48, 12
    state: dict[str, torch.Tensor] = {}

    def step() -> Work:
        if "moments" not in state:  # created by the first step, kept by later ones (an optimizer's moments)
            state["moments"] = torch.ones(kept_mib * 2**20 // 4)
        temporary = torch.ones(temporary_mib * 2**20 // 4)  # activations, freed when the step ends
        return Work(1, 1, float(temporary.numel()))

    def stateless() -> Work:
        torch.ones(temporary_mib * 2**20 // 4)
        return Work(1, 1, 1.0)

    setup = Setup("fake", "fp32", 1, {"ours": Side(step, reset=state.clear), "theirs": Side(stateless)})
    out = measure(setup, warmup=1)
    ours, theirs = out["ours"], out["theirs"]
    if ours["peak_mb"] is None:
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    assert ours["peak_mb"] >= kept_mib + temporary_mib - 4  # the first pass creates the moments again
    assert temporary_mib - 4 <= ours["steady_peak_mb"] < kept_mib  # a later step only adds its temporaries
    assert theirs["steady_peak_mb"] is None and temporary_mib - 4 <= theirs["peak_mb"] < kept_mib


def test_a_case_may_warm_up_longer_than_its_mode_and_the_warm_ups_are_timed_too():
    from bench.cases import Setup, Side, Work, measure

    calls = {"ours": 0, "theirs": 0}

    def side(name: str) -> Side:
        def run() -> Work:
            calls[name] += 1
            return Work(1, 1, 1.0)
        return Side(run)

    setup = Setup("fake", "fp32", 2, {"ours": side("ours"), "theirs": side("theirs")}, warmup=3)
    out = measure(setup, warmup=1)
    assert calls == {"ours": 3 + 2 + 1, "theirs": 3 + 2 + 1}  # warm-ups, timed iterations, the memory pass
    assert len(out["ours"]["warmup_s"]) == 3 and len(out["ours"]["seconds"]) == 2
    assert measure(Setup("fake", "fp32", 1, {"ours": side("ours")}), warmup=1)["ours"]["warmup_s"] != []


def test_evaluation_on_bf16_weights_gives_transformers_autocast_loss(tmp_path):
    results, table = run_quick("eval_bf16_weights", tmp_path)
    result = results["eval_bf16_weights"]
    # evaluate.py --dtype bf16 rounds every weight to bf16, as autocast rounds the Linear weights;
    # LayerNorm, softmax and the loss stay fp32, so the losses agree to bf16 rounding of the embeddings
    assert result["checks"]["loss_rel_diff"] < 1e-3
    assert "| eval_bf16_weights |" in table


def test_validation_over_a_split_gives_transformers_autocast_loss_per_batch(tmp_path):
    results, table = run_quick("eval_bf16_split", tmp_path)
    result = results["eval_bf16_split"]
    # the same fp32 weights under bf16 autocast; ours casts each weight once for the split, theirs
    # once per batch: the same casts, so only the two models' own differences remain (as eval_bf16)
    assert result["checks"]["loss_rel_diff"] < 1e-4
    assert result["sides"]["ours"]["samples_per_s"] > 0
    assert "| eval_bf16_split |" in table and "a split of 3 batches" in table


def test_fp32_evaluation_gives_transformers_loss(tmp_path):
    results, table = run_quick("eval_fp32", tmp_path)
    # the same fp32 model; only the products' summation order differs (oneDNN against MKL)
    assert results["eval_fp32"]["checks"]["loss_rel_diff"] < 1e-5
    assert "| eval_fp32 |" in table


def test_a_case_run_in_several_processes_reports_the_median_one_and_every_ratio(tmp_path):
    results, table = run_quick("eval_bf16", tmp_path, "--processes", "3")
    result = results["eval_bf16"]
    ratios = result["process_ratios"]
    assert len(ratios) == 3
    assert result["ratio"] == sorted(ratios)[1]
    assert "Ratio in each of 3 processes" in table
    assert result["mem_ratio"] in result["process_mem_ratios"] and len(result["process_mem_ratios"]) == 3
    assert "Memory ratio in each: " in table


def test_median_process_picks_the_middle_ratio_and_passes_failures_through():
    runs = [{"case": "x", "ratio": r, "run": i, "mem_ratio": 1.0 - i / 10} for i, r in enumerate((1.3, 0.9, 1.1, 1.2))]
    runs[3]["run_mem_ratio"] = 0.5  # a training case's: its run peak is what the target reads
    chosen = median_process(runs)
    assert chosen["run"] == 2  # 1.1: the lower middle of four
    assert chosen["process_ratios"] == [1.3, 0.9, 1.1, 1.2]
    assert chosen["process_mem_ratios"] == [1.0, 0.9, 0.8, 0.5]
    assert "process_ratios" not in median_process(runs[:1])
    failed = {"case": "x", "error": "child process exited with status 1"}
    assert median_process([runs[0], failed]) is failed


def test_processes_must_be_at_least_one(capsys):
    from bench.run import main
    with pytest.raises(SystemExit):
        main(["--quick", "--processes", "0"])
    assert "--processes must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error_saying_so(capsys):
    from bench.run import main
    with pytest.raises(SystemExit) as exited:
        main(["--quick", "--device", "cuda"])
    assert exited.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_shapes_keep_the_model_and_batches_and_time_more_iterations():
    from dataclasses import asdict

    from bench.shapes import FULL, on_gpu
    gpu = on_gpu(FULL)
    timing = {"warmup", "train_warmup", "lora_iters", "train_iters", "eval_iters", "generate_iters", "real_epochs",
              "peak_matmul_n"}
    assert {k: v for k, v in asdict(gpu).items() if k not in timing} == {
        k: v for k, v in asdict(FULL).items() if k not in timing}
    assert all(getattr(gpu, k) >= getattr(FULL, k) for k in timing) and gpu.lora_iters > FULL.lora_iters


@pytest.mark.parametrize("batch", ["reference", "train.py"])
@pytest.mark.parametrize("mode", ["quick", "full"])
@pytest.mark.parametrize("kind", ["full", "lora", "eval"])
def test_matmul_floor_times_exactly_the_flops_the_bench_counts(mode, kind, batch):
    from bench.floor import analytic_flops, step_products
    from bench.shapes import MODES, at_train_py_batch

    shapes = MODES[mode] if batch == "reference" else at_train_py_batch(MODES[mode])
    products = step_products(shapes, kind)
    assert sum(p.flops for p in products) == pytest.approx(analytic_flops(shapes, kind), rel=1e-12)


def test_matmul_floor_libraries_compute_the_same_product():
    from bench.floor import Product

    for layout, batch in (("linear", 1), ("mm", 1), ("mm_at", 1), ("bmm", 3), ("bmm_at", 3), ("bmm_bt", 3)):
        outputs = [kernel() for kernel in Product(layout, batch, 5, 7, 6, count=2).kernels(torch.float32)]
        assert outputs[0].shape == ((5, 6) if batch == 1 else (3, 5, 6))
        for other in outputs[1:]:  # oneDNN's linear on the same operands, in its own layout
            torch.testing.assert_close(other, outputs[0])


def test_matmul_floor_against_a_results_file_gives_theirs_time_over_the_floor(tmp_path, capsys):
    from bench.floor import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": [
        {"case": "eval_fp32", "sides": {"ours": {"median_s": 0.25}, "theirs": {"median_s": 0.5}}}]}))
    main(["--quick", "--threads", "1", "--reps", "1", "--cases", "eval_fp32,eval_bf16", "--against", str(results)])
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| eval")}
    floor = float(rows["eval_fp32"][1])
    assert rows["eval_fp32"][4] == "0.250 / 0.500"
    assert float(rows["eval_fp32"][5].rstrip("x")) == pytest.approx(0.5 / floor, rel=0.01, abs=0.01)
    assert rows["eval_bf16"][4] == "not in the file"


def test_matmul_floor_refuses_a_file_that_is_not_bench_results(tmp_path):
    from bench.floor import main

    not_results = tmp_path / "other.json"
    not_results.write_text('{"rows": []}')
    with pytest.raises(SystemExit, match=r"other\.json: not a bench\.run --json file"):
        main(["--quick", "--against", str(not_results)])
    with pytest.raises(SystemExit, match=r"cannot read .*missing\.json"):
        main(["--quick", "--against", str(tmp_path / "missing.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is")
def test_matmul_floor_on_cuda_without_a_gpu_is_a_usage_error_saying_so(capsys):
    from bench.floor import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_memory_target_judges_a_training_case_on_a_runs_peak_and_others_on_one_iteration():
    from bench.report import derive, targets

    def result(case, ours, theirs):
        sides = {name: {"samples_per_s": 1.0, "flops_per_s": 1.0, **mb}
                 for name, mb in (("ours", ours), ("theirs", theirs))}
        return derive({"case": case, "dtype": "bf16", "matmul_peak_flops": {"bf16": 2.0}, "sides": sides})

    # first step 1.0x; a later step 800 against 1000 MB over 2000 MB of moments: the run peaks at 2800 against 3000
    training = result("full_bf16",
                      {"peak_mb": 2700.0, "steady_peak_mb": 800.0, "state_mb": 2000.0, "run_peak_mb": 2800.0},
                      {"peak_mb": 2700.0, "steady_peak_mb": 1000.0, "state_mb": 2000.0, "run_peak_mb": 3000.0})
    evaluation = result("eval_bf16", {"peak_mb": 85.0}, {"peak_mb": 100.0})
    assert training["mem_ratio"] == 1.0 and training["run_mem_ratio"] == 2800 / 3000
    line = targets([training, evaluation]).splitlines()[-1]
    assert "**NOT met**" in line
    assert "full_bf16 0.93x (a run's peak) (not met)" in line and "eval_bf16 0.85x (met)" in line


def test_a_profile_warms_the_side_up_as_often_as_the_timed_run_does(monkeypatch):
    from bench import cases, run
    from bench.cases import Setup, Side, Work

    calls = []

    def fake_case(shapes, device):
        return Setup("fake", "fp32", 1, {"ours": Side(lambda: calls.append("run") or Work(1, 1, 1.0))}, warmup=2)

    monkeypatch.setitem(cases.CASES, "full_bf16", fake_case)
    table = run.profile("full_bf16", "quick", threads=1, side="ours", iters=3, rows=5)
    assert calls == ["run"] * (2 + 3)  # the case's own two warm-ups (full fine-tuning's), then 3 profiled
    assert "fake: ours, 3 iteration(s)" in table
