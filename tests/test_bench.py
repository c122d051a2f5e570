"""The benchmark harness runs both sides on tiny shapes and reports sane, comparable numbers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(cases: str, tmp_path: Path) -> tuple[dict[str, dict], str]:
    """(results by case, the printed report) of `bench.run --quick --cases CASES`."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--cases", cases, "--json", str(out)],
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
        assert r["ratio"] == ours["samples_per_s"] / theirs["samples_per_s"]
        assert 0 < r["ours_frac"] < 1.5  # analytic FLOPs over the measured matmul peak
    # same weights, same settings: beam search must pick the same tokens on both sides
    assert results["beam4"]["checks"]["same_output"] is True
    assert "| lora_bf16 |" in table and "| beam4 |" in table and "Targets" in table


def test_evaluation_on_bf16_weights_gives_transformers_autocast_loss(tmp_path):
    results, table = run_quick("eval_bf16_weights", tmp_path)
    result = results["eval_bf16_weights"]
    # evaluate.py --dtype bf16 rounds every weight to bf16, as autocast rounds the Linear weights;
    # LayerNorm, softmax and the loss stay fp32, so the losses agree to bf16 rounding of the embeddings
    assert result["checks"]["loss_rel_diff"] < 1e-3
    assert "| eval_bf16_weights |" in table
