"""DistributedDataParallel on CPU (gloo): N ranks at batch B train like one process at batch N*B."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.checkpointing import RunDir
from engine.distributed import World, from_env
from engine.lora import inject_lora, mark_only_lora_trainable
from engine.trainer import TrainConfig, train
from models import bart
from models.bart import HEAD_CHUNK_ROWS
from models.checkpoint import load_state_dict_from_dir
from tests.test_trainer import random_split, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(batch_size: int, **overrides) -> TrainConfig:
    base = dict(lr=3e-3, epochs=2, batch_size=batch_size, grad_accum=2, warmup=1, amp="off", eval_every=2,
                patience=10, seed=0, progress=False)
    return TrainConfig(**{**base, **overrides})


class Crash(Exception):
    pass


def run(out: Path, tokenizer, batch_size: int, world: World = World(), resume: bool = False,
        crash_at: int | None = None, dropout: float = 0.0, copy_attention: float = 0.0, lora: bool = False):
    """`lora`: rank-4 q/v adapters on a frozen base, and the frozen LM head's loss in 2-row chunks
    (models/head_loss.py), whose gradient is made in the forward pass."""
    model = tiny_model(tokenizer.vocab_size, dropout=dropout)
    if lora:
        inject_lora(model, "q_proj,v_proj", rank=4, alpha=8.0)
        mark_only_lora_trainable(model)
        bart.HEAD_CHUNK_ROWS = 2  # this process only: a spawned rank or the test's own, reset below
    run_dir = RunDir(out)
    if world.is_main:
        run_dir.prepare(resume=resume, overwrite=False)
    world.barrier()
    if resume:
        run_dir.restore_weights(run_dir.last, model)

    def crash(state):
        if state.step == crash_at:
            raise Crash

    try:
        return train(model, tokenizer, random_split(26, tokenizer.vocab_size, 2),
                     random_split(6, tokenizer.vocab_size, 3), config(batch_size, copy_attention=copy_attention),
                     run_dir, torch.device("cpu"), resume=resume, world=world, on_step_end=crash)
    finally:
        bart.HEAD_CHUNK_ROWS = HEAD_CHUNK_ROWS


def worker(rank: int, size: int, port: int, out: str, tokenizer, jobs: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world, _ = from_env("cpu")
    try:
        for job in jobs:
            try:
                run(Path(out), tokenizer, batch_size=2, world=world, **job)
            except Crash:
                pass
    finally:
        dist.destroy_process_group()
    # All work is done and checked by the parent. Skip the interpreter's C++ teardown: once in a
    # few full-suite runs a rank died there with SIGABRT ("terminate called without an active
    # exception") after finishing, which mp.spawn reports as a failure. Errors above still raise.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(out: Path, tokenizer, jobs: list) -> None:
    mp.spawn(worker, args=(2, free_port(), str(out), tokenizer, jobs), nprocs=2, join=True)


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import train_bart_tokenizer
    return train_bart_tokenizer(["alpha beta gamma delta", "epsilon zeta eta theta"] * 10, vocab_size=300,
                                min_frequency=1)


def weights(directory: Path) -> dict:
    return load_state_dict_from_dir(directory)


@pytest.mark.parametrize("copy_attention", [0.0, 1.0])
def test_two_ranks_reach_the_weights_of_one_process_with_the_same_global_batch(tmp_path, tokenizer, copy_attention):
    single = run(tmp_path / "single", tokenizer, batch_size=4, copy_attention=copy_attention)
    spawn(tmp_path / "ddp", tokenizer, [{"copy_attention": copy_attention}])
    # 26 examples: 7 global batches (the last holds 2, one per rank) -> 4 steps of 2 micro-batches, 2 epochs
    assert single.summary["steps"] == 8
    one, two = weights(tmp_path / "single" / "last"), weights(tmp_path / "ddp" / "last")
    for name in one:
        if copy_attention and name.endswith("encoder_attn.k_proj.bias"):
            # A key bias adds the same score to every source position, so softmax ignores it and its
            # gradient is zero but for rounding, which Adam scales up to full steps: noise either way.
            continue
        torch.testing.assert_close(two[name], one[name], atol=2e-6, rtol=1e-5, msg=name)
    # Only rank 0 wrote the log: one line per step, not one per rank.
    log = RunDir(tmp_path / "ddp").read_log()
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    single_losses = [r["loss"] for r in single.history if "loss" in r]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx(single_losses, rel=1e-5)
    if copy_attention:  # the copy loss is averaged over both ranks' copied tokens, as in one process
        single_copy = [r["copy_attention_loss"] for r in single.history if "loss" in r]
        assert [r["copy_attention_loss"] for r in log if "loss" in r] == pytest.approx(single_copy, rel=1e-5)


def test_two_lora_ranks_with_the_lm_head_loss_in_chunks_reach_the_weights_of_one_process(tmp_path, tokenizer):
    single = run(tmp_path / "single", tokenizer, batch_size=4, lora=True)
    spawn(tmp_path / "ddp", tokenizer, [{"lora": True}])
    one, two = weights(tmp_path / "single" / "last"), weights(tmp_path / "ddp" / "last")  # adapters merged
    q_proj = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(one[q_proj], tiny_model(tokenizer.vocab_size).state_dict()[q_proj])  # they trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-6, rtol=1e-5, msg=name)
    log = RunDir(tmp_path / "ddp").read_log()
    single_losses = [r["loss"] for r in single.history if "loss" in r]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx(single_losses, rel=1e-5)


def test_a_crashed_two_rank_run_resumes_exactly(tmp_path, tokenizer):
    spawn(tmp_path / "straight", tokenizer, [{"dropout": 0.1}])
    spawn(tmp_path / "crashed", tokenizer, [{"dropout": 0.1, "crash_at": 3}, {"dropout": 0.1, "resume": True}])
    straight, resumed = RunDir(tmp_path / "straight").read_log(), RunDir(tmp_path / "crashed").read_log()
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == {r["step"]: r["loss"] for r in straight if "loss" in r}
    one, two = weights(tmp_path / "straight" / "last"), weights(tmp_path / "crashed" / "last")
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_torchrun_trains_with_two_processes_from_the_command_line(tmp_path):
    from tests.test_cli import tiny_checkpoint
    import json
    data = tmp_path / "data"
    data.mkdir()
    records = json.loads((ROOT / "data" / "train.json").read_text(encoding="utf-8"))
    (data / "train.json").write_text(json.dumps(records[:16]))
    (data / "val.json").write_text(json.dumps(records[16:20]))
    base = tiny_checkpoint(tmp_path / "base", data)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "train.py", "--model", str(base), "--full-finetune", "--batch-size", "2", "--epochs", "1",
         "--data-dir", str(data), "--output-dir", str(out), "--no-progress", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("***** train metrics *****") == 1  # printed by rank 0 only
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3, 4]  # 16 records / (2 x 2)
    assert (out / "best" / "model.safetensors").exists()
