"""train.py, evaluate.py and summarize.py as a user runs them: outputs, exit codes, messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import summarize
import train
from models import packed_weights
from models.bart import BartForConditionalGeneration
from models.checkpoint import save_pretrained
from models.config import BartConfig
from models.tokenizer import train_bart_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small copy of the bundled dataset: 24 train, 6 val, 6 test records."""
    out = tmp_path_factory.mktemp("data")
    records = json.loads((ROOT / "data" / "train.json").read_text(encoding="utf-8"))
    for name, chunk in (("train", records[:24]), ("val", records[24:30]), ("test", records[30:36])):
        (out / f"{name}.json").write_text(json.dumps(chunk), encoding="utf-8")
    return out


def tiny_checkpoint(directory: Path, data_dir: Path, extra_vocab: int = 0, missing_vocab: int = 0) -> Path:
    """A random tiny model and a tokenizer trained on the data, saved as a HF model directory."""
    records = json.loads((data_dir / "train.json").read_text())
    tokenizer = train_bart_tokenizer([r["summary"] for r in records], vocab_size=400)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=tokenizer.vocab_size + extra_vocab - missing_vocab, max_position_embeddings=512, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_length=12, num_beams=2, forced_bos_token_id=0))
    return save_pretrained(model, directory, tokenizer)


def run_cli(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, module, *args], cwd=ROOT, capture_output=True, text=True, input=stdin,
                          timeout=300)


def common(data_dir, out) -> list[str]:
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--no-progress", "--cache-dir", str(out) + "-cache"]


def test_train_from_scratch_writes_loadable_last_and_best_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["--model", "tiny", "--full-finetune", "--vocab-size", "400", "--max-steps", "3",
                       "--batch-size", "8", "--lr", "1e-3", "--copy-attention", "1.0", *common(data_dir, out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "train_samples_per_second" in printed and "eval_loss" in printed
    assert "% of target tokens copy a source token" in printed
    for checkpoint in ("last", "best"):
        names = {p.name for p in (out / checkpoint).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert (out / "last" / "training_state.pt").exists()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")  # the loss curve, drawn after training
    settings = json.loads((out / "run_config.json").read_text())
    assert settings["model"] == "tiny" and settings["lr"] == 1e-3 and settings["lora"] is False
    assert settings["copy_attention"] == 1.0  # a resumed run keeps the copy loss
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["copy_attention_loss"] > 0 for r in steps if "loss" in r)
    # Evaluating the run needs no flags beyond where it is.
    assert evaluate.main(["--model", str(out), "--data-dir", str(data_dir), "--split", "test", "--no-generate",
                          "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0


def test_negative_copy_attention_weight_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--copy-attention", "-1"])
    assert exit_info.value.code == 2
    assert "--copy-attention: must be >= 0" in capsys.readouterr().err


def test_lora_run_saves_the_adapter_and_trains_only_it(data_dir, tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base", data_dir)
    out = tmp_path / "lora"
    assert train.main(["--model", str(base), "--max-steps", "2", "--lora-rank", "2", *common(data_dir, out)]) == 0
    # q and v of 3 attention blocks (encoder self, decoder self, cross) = 6 layers x rank 2 x (16 + 16)
    assert "trainable parameters: 384 of" in capsys.readouterr().out
    adapter = json.loads((out / "best" / "adapter" / "adapter_config.json").read_text())
    assert adapter["rank"] == 2 and adapter["targets"] == "q_proj,v_proj"


def test_resume_continues_a_run_and_refuses_to_overwrite_without_a_flag(data_dir, tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base", data_dir)
    out = tmp_path / "run"
    args = ["--model", str(base), "--full-finetune", "--epochs", "2", "--batch-size", "8", *common(data_dir, out)]
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main(args) == 2
    assert "--resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert train.main([*args, "--resume"]) == 0  # already finished: nothing left, still a clean exit
    assert train.main([*args, "--overwrite"]) == 0


def test_sweep_trains_the_grid_sorts_by_validation_loss_and_keeps_the_best(data_dir, tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base", data_dir)
    out = tmp_path / "sweep"
    code = train.main(["--model", str(base), "--full-finetune", "--lr", "1e-4,3e-3", "--weight-decay", "0.0,0.1",
                       "--max-steps", "2", *common(data_dir, out)])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    losses = [r["eval_loss"] for r in sweep["runs"]]
    assert len(losses) == 4 and losses == sorted(losses)
    assert (out / "best" / "model.safetensors").exists()
    assert sweep["best"] == sweep["runs"][0]["run"]
    kept = [r["run"] for r in sweep["runs"] if (out / "runs" / r["run"] / "best").exists()]
    assert kept == [sweep["best"]]
    assert "best val loss" in capsys.readouterr().out
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_bad_data_is_a_one_line_error_with_exit_2_and_no_traceback(data_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text('[{"diagnosis": "CAD", "summary": "ok"}, {"diagnosis": "x"')
    (bad / "val.json").write_text((data_dir / "val.json").read_text())
    result = run_cli("train.py", "--model", "tiny", "--full-finetune", *common(bad, tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad / 'train.json'}: invalid JSON at line 1" in result.stderr


def test_unavailable_hub_model_offline_says_how_to_download_and_how_to_run_the_demo(data_dir, tmp_path):
    env_prefix = ["env", "HF_HUB_OFFLINE=1", f"HF_HOME={tmp_path / 'hf'}"]
    result = subprocess.run([*env_prefix, sys.executable, "train.py", *common(data_dir, tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sshleifer/distilbart-cnn-12-6" in result.stderr and "download" in result.stderr
    assert "--model tiny" in result.stderr


def test_evaluate_reports_metrics_and_writes_predictions(data_dir, tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    metrics_out, predictions_out = tmp_path / "m.json", tmp_path / "p.jsonl"
    code = evaluate.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--split", "test",
                          "--metrics-out", str(metrics_out), "--predictions-out", str(predictions_out),
                          "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    metrics = json.loads(metrics_out.read_text())
    for key in ("eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len_tokens",
                "abbreviation_expansion_accuracy", "eval_samples_per_second", "generate_samples_per_second"):
        assert key in metrics, key
    assert metrics["num_samples"] == 6 and metrics["expansions_expected"] > 0
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    rows = [json.loads(line) for line in predictions_out.read_text().splitlines()]
    test_records = json.loads((data_dir / "test.json").read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in test_records]
    assert all(set(r) == {"id", "source", "reference", "prediction"} for r in rows)
    assert "rougeLsum" in capsys.readouterr().out


@pytest.mark.skipif(not packed_weights.BF16_AVAILABLE, reason="no oneDNN bf16 packs on this machine")
def test_no_weight_packs_makes_evaluate_pack_nothing_and_changes_no_metric(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(packed_weights, "_enabled", True)  # main() sets it process-wide; restored after
    packed = []
    pack = packed_weights.prepacked
    monkeypatch.setattr(packed_weights, "prepacked", lambda weight: packed.append(weight.shape) or pack(weight))
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)

    def metrics(*flags: str) -> dict:
        out = tmp_path / f"metrics{len(flags)}.json"
        assert evaluate.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--limit", "3", "--dtype",
                              "bf16", "--metrics-out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "c"),
                              "--device", "cpu", *flags]) == 0  # packs are CPU-only; auto picks a GPU
        return {k: v for k, v in json.loads(out.read_text()).items() if "runtime" not in k and "per_second" not in k}

    with_packs = metrics()
    packs_made = len(packed)
    without = metrics("--no-weight-packs")
    assert packs_made > 0 and len(packed) == packs_made  # the second run packed nothing
    assert without == with_packs


def test_evaluate_limit_and_loss_only(data_dir, tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    out = tmp_path / "m.json"
    assert evaluate.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--limit", "2", "--no-generate",
                          "--metrics-out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 2 and "rouge1" not in metrics


def test_evaluate_errors_are_clear(data_dir, tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    args = ["--data-dir", str(data_dir), "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert evaluate.main(["--model", str(model_dir), "--split", "nope", *args]) == 2
    assert "nope.json: no such split file; available: test, train, val" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    assert evaluate.main(["--model", str(empty), *args]) == 2
    assert "empty: no model weights found; looked for model.safetensors" in capsys.readouterr().err
    small = tiny_checkpoint(tmp_path / "small", data_dir, missing_vocab=150)
    assert evaluate.main(["--model", str(small), *args]) == 2
    assert "does not belong to this model" in capsys.readouterr().err


def test_tokenizer_one_larger_than_the_model_or_smaller_still_works(data_dir, tmp_path):
    # distilbart-cnn-12-6: 50,264 embeddings, 50,265 tokens; encoding never yields the last (<mask>).
    one_short = tiny_checkpoint(tmp_path / "short", data_dir, missing_vocab=1)
    larger = tiny_checkpoint(tmp_path / "larger", data_dir, extra_vocab=8)
    for model_dir in (one_short, larger):
        assert evaluate.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--limit", "2",
                              "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0


def test_summarize_reads_a_record_a_list_or_json_lines_from_file_or_stdin(data_dir, tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    records = json.loads((data_dir / "test.json").read_text())[:3]
    for record in records:
        del record["summary"]  # deployment input has no reference
    one, many = tmp_path / "one.json", tmp_path / "many.jsonl"
    one.write_text(json.dumps(records[0]))
    many.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_cli("summarize.py", "--model", str(model_dir), str(one))
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 1
    result = run_cli("summarize.py", "--model", str(model_dir), "-", stdin=json.dumps(records))
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 3
    out = tmp_path / "s.jsonl"
    assert summarize.main(["--model", str(model_dir), str(many), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]


def test_summarize_builds_the_source_exactly_as_training_does(data_dir, tmp_path, monkeypatch):
    from data.records import RecordFormat

    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    record = json.loads((data_dir / "test.json").read_text())[0]
    seen = {}

    def capture(model, tokenizer, sources, *args, **kwargs):
        seen["ids"] = sources
        return ["x"] * len(sources)

    monkeypatch.setattr(summarize, "summarize_ids", capture)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    assert summarize.main(["--model", str(model_dir), str(path)]) == 0
    from models.tokenizer import load_tokenizer
    expected = load_tokenizer(model_dir).encode(RecordFormat().to_example(record, "0").source, 512)
    assert seen["ids"] == [expected]


def test_summarize_bad_record_is_a_clear_error(data_dir, tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path / "model", data_dir)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"diagnosis": "CAD"}, {"unrelated": "x"}]))
    assert summarize.main(["--model", str(model_dir), str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: record 1" in err and "patient_history" in err
