"""The training loop: accumulation, exact resume, early stopping, NaN handling, safe checkpoints."""

import json
import math

import pytest
import torch

import engine.trainer as trainer_module
from data.batching import TokenizedSplit, collate
from engine.checkpointing import RunDir, RunDirError, merged_state_dict
from engine.evaluation import LossReport
from engine.lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from engine.optim import AdamW
from engine.trainer import TrainConfig, TrainingError, accumulate_gradients, train
from models import onednn_linear
from models.bart import BartForConditionalGeneration
from models.checkpoint import load_state_dict_from_dir
from models.config import BartConfig
from models.tokenizer import train_bart_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bart_tokenizer(["alpha beta gamma delta", "epsilon zeta eta theta"] * 10, vocab_size=300,
                                min_frequency=1)


def tiny_model(vocab_size: int, seed: int = 0, dropout: float = 0.1) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab_size, max_position_embeddings=64, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        dropout=dropout))


def random_split(n: int, vocab_size: int, seed: int) -> TokenizedSplit:
    """Examples whose target is the source reversed: learnable, with uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for _ in range(n):
        length = int(torch.randint(2, 12, (1,), generator=g))
        body = torch.randint(5, vocab_size - 1, (length,), generator=g).tolist()
        sources.append([0] + body + [2])
        targets.append([0] + body[::-1] + [2])
    return TokenizedSplit(sources, targets)


def config(**overrides) -> TrainConfig:
    base = dict(lr=3e-3, epochs=2, batch_size=4, grad_accum=2, warmup=2, amp="off", eval_every=3, patience=10,
                seed=0, progress=False)
    return TrainConfig(**{**base, **overrides})


def test_four_micro_batches_of_one_give_the_gradients_of_one_batch_of_four(tokenizer):
    split = random_split(4, tokenizer.vocab_size, seed=1)
    grads = []
    for groups in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]):
        model = tiny_model(tokenizer.vocab_size, dropout=0.0)
        loss = accumulate_gradients(model, [collate(split, g, 1, 2) for g in groups], CPU)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_one, one), (loss_four, four) = grads
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    for name in one:
        torch.testing.assert_close(four[name], one[name], atol=1e-6, rtol=1e-5, msg=name)


def test_backward_runs_outside_autocast_with_the_gradients_it_gave_inside(tokenizer):
    """Autocast keeps its bf16 copy of every trainable weight until its context exits, so the
    backward must not run inside it; the backward ops keep the forward's dtypes either way."""
    split = random_split(4, tokenizer.vocab_size, seed=2)
    batch = collate(split, [0, 1, 2, 3], 1, 2)
    model = tiny_model(tokenizer.vocab_size)
    autocast_in_backward = []
    model.lm_head.weight.register_hook(lambda grad: autocast_in_backward.append(torch.is_autocast_enabled("cpu")))
    torch.manual_seed(3)
    accumulate_gradients(model, [batch], CPU, torch.autocast("cpu", dtype=torch.bfloat16))
    assert autocast_in_backward == [False]
    ours = {n: p.grad for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels,
                    return_logits=False, loss_reduction="sum")
        (out.loss / batch.num_target_tokens).backward()
    for name, param in model.named_parameters():
        assert torch.equal(ours[name], param.grad), name


class Crash(Exception):
    pass


def crash_after(step: int):
    def hook(state):
        if state.step == step:
            raise Crash

    return hook


def run_training(tmp_path, tokenizer, name, lora=None, resume=False, hook=None, **overrides):
    model = tiny_model(tokenizer.vocab_size)
    if lora is not None:
        inject_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
        mark_only_lora_trainable(model)
    run = RunDir(tmp_path / name)
    run.prepare(resume=resume, overwrite=False)
    if resume:
        run.restore_weights(run.last, model)
    train_split = random_split(24, tokenizer.vocab_size, seed=2)
    val_split = random_split(8, tokenizer.vocab_size, seed=3)
    result = train(model, tokenizer, train_split, val_split, config(**overrides), run, CPU, lora, resume=resume,
                   on_step_end=hook)
    return model, result


def step_losses(history):
    return {r["step"]: r["loss"] for r in history if "loss" in r}


@pytest.mark.parametrize("products", ["default", "onednn"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resumed_run_repeats_the_uninterrupted_losses_and_weights(tmp_path, tokenizer, mode, products, monkeypatch):
    if products == "onednn":  # the tiny model's fp32 products are below MIN_MACS: force models/onednn_linear.py
        monkeypatch.setattr(onednn_linear, "MIN_MACS", 0)
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.1, targets="q_proj,v_proj") if mode == "lora" else None
    straight, straight_result = run_training(tmp_path, tokenizer, "straight", lora)
    with pytest.raises(Crash):  # dies two steps after the checkpoint of step 3
        run_training(tmp_path, tokenizer, "crashed", lora, hook=crash_after(5))
    resumed, resumed_result = run_training(tmp_path, tokenizer, "crashed", lora, resume=True)

    expected = step_losses(straight_result.history)
    assert len(expected) == 6  # 24 examples / (4 x 2) = 3 steps per epoch, 2 epochs
    assert step_losses(resumed_result.history) == expected  # exactly, dropout included
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights(tmp_path, tokenizer, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
    monkeypatch.setattr(trainer_module, "evaluate_loss",
                        lambda *args, **kwargs: LossReport(next(scripted), 10, 8, 0.01))
    model, result = run_training(tmp_path, tokenizer, "plateau", eval_every=1, patience=2, epochs=5)
    summary = result.summary
    assert summary["stopped_early"] and summary["steps"] == 4  # evals at steps 1..4; 2 worse after step 2
    assert summary["best_step"] == 2 and summary["eval_loss"] == 2.0
    best = load_state_dict_from_dir(tmp_path / "plateau" / "best")
    weights = merged_state_dict(model)
    for name, tensor in best.items():
        torch.testing.assert_close(weights[name], tensor, msg=name)
    last = load_state_dict_from_dir(tmp_path / "plateau" / "last")
    assert any(not torch.equal(last[n], best[n]) for n in best)  # last really is later than best


def test_nan_losses_skip_updates_then_stop_with_a_clear_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(trainer_module, "accumulate_gradients", lambda *args, **kwargs: math.nan)
    model = tiny_model(tokenizer.vocab_size)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    run = RunDir(tmp_path / "nan")
    run.prepare(resume=False, overwrite=False)
    with pytest.warns(UserWarning, match="loss is nan; skipping this update"):
        with pytest.raises(TrainingError, match="NaN or infinite for 5 steps in a row"):
            train(model, tokenizer, random_split(80, tokenizer.vocab_size, 2), random_split(4, tokenizer.vocab_size, 3),
                  config(eval_every=100), run, CPU)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_existing_run_is_never_silently_overwritten(tmp_path, tokenizer):
    run_training(tmp_path, tokenizer, "run", max_steps=1)
    with pytest.raises(RunDirError, match="--resume to continue it, --overwrite to replace it"):
        RunDir(tmp_path / "run").prepare(resume=False, overwrite=False)
    RunDir(tmp_path / "run").prepare(resume=False, overwrite=True)
    assert not (tmp_path / "run" / "last").exists()
    with pytest.raises(RunDirError, match="nothing to resume"):
        RunDir(tmp_path / "fresh").prepare(resume=True, overwrite=False)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model, _ = run_training(tmp_path, tokenizer, "run", max_steps=3)
    run = RunDir(tmp_path / "run")
    before = load_state_dict_from_dir(run.last)

    def torch_save_that_dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        run.save(run.last, model, tokenizer, None, {"state": {}})
    after = load_state_dict_from_dir(run.last)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert (run.last / "training_state.pt").exists()
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_metrics_log_has_a_line_per_step_and_per_validation_and_a_closing_summary(tmp_path, tokenizer):
    _, result = run_training(tmp_path, tokenizer, "log")
    lines = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] >= 0 and r["tokens_per_second"] > 0 for r in steps)
    assert [r["step"] for r in lines if "eval_loss" in r] == [3, 6]
    summary = lines[-1]["summary"]
    for key in ("train_runtime", "train_samples_per_second", "eval_loss", "eval_runtime", "eval_samples_per_second"):
        assert summary[key] is not None and summary[key] > 0, key
    # The loss really went down on this learnable task.
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_each_step_hands_adamw_clips_coefficient_and_has_it_free_every_gradient(tmp_path, tokenizer, monkeypatch):
    calls = []
    step = AdamW.step

    def spied_step(self, closure=None, clip_coef=None, release_grads=False):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        copies = [torch.zeros_like(p, requires_grad=True) for p in params]
        for p, c in zip(params, copies):
            c.grad = p.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(copies, 0.05)  # as the loop would have clipped them
        result = step(self, closure, clip_coef=clip_coef, release_grads=release_grads)
        calls.append((float(norm), float(clip_coef), release_grads, all(p.grad is None for p in params)))
        return result

    monkeypatch.setattr(AdamW, "step", spied_step)
    _, result = run_training(tmp_path, tokenizer, "clip", max_grad_norm=0.05, max_steps=3, eval_every=100)
    assert len(calls) == 3
    for norm, coefficient, release_grads, released in calls:
        assert coefficient == pytest.approx(0.05 / (norm + 1e-6), rel=1e-6) and coefficient < 1.0
        assert release_grads and released
    logged = [r["grad_norm"] for r in result.history if "grad_norm" in r]
    assert logged == pytest.approx([norm for norm, *_ in calls], rel=1e-6)
