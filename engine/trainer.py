"""The training loop, read top to bottom.

One optimizer step = `grad_accum` micro-batches. Each micro-batch's loss is the *sum* over its
target tokens divided by the target tokens of the whole accumulated batch, so the gradient is
that of the token-mean loss over everything the step saw (dividing each micro-batch's mean by
`grad_accum` would weight short targets more). Then: unscale (fp16), clip (the norm here, the scaling
inside AdamW's update: engine/grad_clip.py), AdamW step, next LR.

Validation runs every `eval_every` steps and at each epoch's end; the plateau monitor decides
when to stop, `best/` keeps the best weights and `last/` everything needed to resume exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.batching import LengthGroupedSampler, TokenizedSplit, collate
from engine.checkpointing import RunDir
from engine.copy_attention import CopyAttentionLoss, match_keys
from engine.distributed import World
from engine.early_stopping import EarlyStopping
from engine.evaluation import evaluate_loss
from engine.frozen_weights import hold_frozen_linears_in, restore_originals
from engine.grad_clip import clip_coefficient
from engine.lora import LoRAConfig
from engine.optim import AdamW, param_groups_for_weight_decay
from engine.schedule import set_lr
from models.lookup_grad import adding_rows_into_grad

AMP_MODES = ("auto", "bf16", "fp16", "off")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says what to try."""


@dataclass
class TrainConfig:
    lr: float = 5e-5
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup: float = 0.0  # < 1: fraction of the total steps; >= 1: a number of steps
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    amp: str = "auto"
    eval_every: int | None = None  # steps; validation also runs at every epoch's end
    eval_batch_size: int | None = None
    patience: int = 3
    min_delta: float = 0.0
    seed: int = 0
    max_bad_steps: int = 5  # NaN/inf losses in a row before giving up
    copy_attention: float = 0.0  # weight of the guided copy-attention loss (engine/copy_attention.py); 0 = off
    progress: bool = True


@dataclass
class TrainState:
    """Where the run is; saved in `last/` so a resumed run continues from exactly here."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    bad_steps: int = 0
    train_time: float = 0.0
    samples_seen: int = 0
    loss_sum: float = 0.0  # for the run's mean training loss
    losses_seen: int = 0


@dataclass
class TrainResult:
    summary: dict
    history: list[dict] = field(default_factory=list)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed)."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp], amp == "fp16"


def warmup_steps(warmup: float, total_steps: int) -> int:
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total_steps)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def accumulate_gradients(model, micro_batches: list, device, autocast=None, scaler=None,
                         world: World = World(), copy_loss: CopyAttentionLoss | None = None) -> float:
    """Backward over the micro-batches of one step; returns the token-mean loss of all of them.

    Each micro-batch contributes (sum of its token losses) / (target tokens of the whole step,
    on every rank), so the gradients equal those of one batch holding every example. DDP
    averages gradients over ranks, hence the factor `world.size`; it synchronises only after
    the last micro-batch. With `copy_loss` (called inside its `watching()`), its weighted sum
    over copied tokens / (copied tokens of the whole step) is added the same way, and its mean
    is left in `copy_loss.step_mean`.
    """
    num_tokens = world.sum(sum(b.num_target_tokens for b in micro_batches), device)
    if copy_loss is not None:
        num_copied = max(world.sum(sum(copy_loss.num_copied(b) for b in micro_batches), device), 1)
        copy_sum = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        last = i == len(micro_batches) - 1
        with nullcontext() if last or not world.distributed else model.no_sync():
            # DDP's all-reduce starts from gradient hooks, which the rows added into .grad bypass
            with autocast or nullcontext(), adding_rows_into_grad(not world.distributed):
                out = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels,
                            return_logits=False, loss_reduction="sum")
                loss = out.loss * world.size / num_tokens
                if copy_loss is not None:
                    copy = copy_loss(batch)
                    loss = loss + copy_loss.weight * copy * world.size / num_copied
                    copy_sum += copy.detach()
            # Backward outside autocast, as PyTorch advises: autocast keeps its bf16 copy of every
            # trainable weight until its context exits, so inside it all of them (612 MB for a full
            # distilbart-cnn-12-6) lived to the end of backward instead of going layer by layer.
            # Gradients are bit for bit the same. Full bf16 step at bench shapes, freed memory kept:
            # forward + backward peak RSS -241 MB, the process's steady RSS 8084 -> 7737 MB.
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += out.loss.detach()
    if copy_loss is not None:
        copy_loss.step_mean = world.sum(float(copy_sum), device) / num_copied
    return world.sum(float(loss_sum), device) / num_tokens


def train(
    model,
    tokenizer,
    train_split: TokenizedSplit,
    val_split: TokenizedSplit,
    config: TrainConfig,
    run: RunDir,
    device: torch.device,
    lora_config: LoRAConfig | None = None,
    resume: bool = False,
    on_step_end: Callable[[TrainState], None] | None = None,
    world: World = World(),
    base_dir: str | Path | None = None,
) -> TrainResult:
    """Train `model` in place. `base_dir`: the model directory its weights came from; with mixed
    precision, frozen Linear weights are then held in the autocast dtype while training and their
    fp32 values re-read from there when saving (engine/frozen_weights.py)."""
    pad_id, start_id = model.config.pad_token_id, model.config.decoder_start_token_id
    amp_dtype, needs_scaler = resolve_amp(config.amp, device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext())
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    model.to(device).train()
    originals = hold_frozen_linears_in(model, amp_dtype, base_dir) if amp_dtype and base_dir else None
    # Forward/backward go through DDP when there are several ranks; everything else uses `model`.
    step_model = torch.nn.parallel.DistributedDataParallel(model) if world.distributed else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(param_groups_for_weight_decay(model, config.weight_decay), lr=config.lr,
                      weight_decay=config.weight_decay)
    sampler = LengthGroupedSampler(train_split.lengths(), config.batch_size, seed=config.seed,
                                   num_replicas=world.size, rank=world.rank)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = warmup_steps(config.warmup, total_steps)
    monitor = EarlyStopping("min", config.patience, config.min_delta)
    eval_every = config.eval_every or steps_per_epoch
    state = TrainState()

    if resume:
        saved = run.load_training_state()
        state = TrainState(**saved["state"])
        optimizer.load_state_dict(saved["optimizer"])
        monitor.load_state_dict(saved["early_stopping"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        if len(saved["rng"]) != world.size:
            raise TrainingError(f"{run.last} was saved by {len(saved['rng'])} processes; resume it with as many")
        set_rng_state(saved["rng"][world.rank])
        if world.is_main:
            run.truncate_log(state.step)

    def log(record: dict) -> None:
        if world.is_main:
            run.log(record)

    def save_last() -> None:
        rng_states = world.gather(rng_state())  # every rank's dropout stream, for an exact resume
        if world.is_main:
            run.save(run.last, model, tokenizer, lora_config, {
                "state": asdict(state), "optimizer": optimizer.state_dict(), "early_stopping": monitor.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states,
            }, originals)
        world.barrier()

    def validate() -> dict:
        report = evaluate_loss(model, val_split, config.eval_batch_size or config.batch_size, device, pad_id,
                               start_id, autocast if amp_dtype else None)
        improved = monitor.update(report.loss, state.step)
        record = {"step": state.step, "epoch": round(state.epoch + state.batches_done / max(len(sampler), 1), 4),
                  "eval_loss": report.loss, "eval_runtime": report.runtime,
                  "eval_samples_per_second": report.samples_per_second, "best": improved}
        log(record)
        if improved and world.is_main:
            run.save(run.best, model, tokenizer, lora_config, originals=originals)
        save_last()
        if world.is_main:
            bar.write(f"step {state.step}: eval loss {report.loss:.4f}" + (" (best)" if improved else ""))
        return record

    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
               disable=not (config.progress and world.is_main),
               dynamic_ncols=True)
    copy_loss = (CopyAttentionLoss(model, train_split, config.copy_attention, match_keys(tokenizer))
                 if config.copy_attention else None)
    if copy_loss is not None and world.is_main:
        bar.write(f"copy attention: {100 * copy_loss.copied_fraction:.1f}% of target tokens copy a source token")
    last_eval = None
    with copy_loss.watching(model) if copy_loss is not None else nullcontext():
        while state.step < total_steps and not monitor.should_stop:
            batches = sampler.epoch_batches(state.epoch)
            while state.batches_done < len(batches) and state.step < total_steps and not monitor.should_stop:
                step_start = time.perf_counter()
                group = batches[state.batches_done:state.batches_done + config.grad_accum]
                micro_batches = [collate(train_split, indices, pad_id, start_id) for indices in group]
                lr = set_lr(optimizer, state.step, warmup, total_steps, config.schedule)[0]

                num_tokens = sum(b.num_target_tokens for b in micro_batches)
                step_loss = accumulate_gradients(step_model, micro_batches, device, autocast, scaler, world,
                                                 copy_loss)

                grad_norm = None
                if math.isfinite(step_loss):
                    state.bad_steps = 0
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    clip_coef = None
                    if config.max_grad_norm > 0:  # AdamW scales the gradients as it reads them
                        norm, clip_coef = clip_coefficient(trainable, config.max_grad_norm)
                        grad_norm = float(norm)
                    # each gradient freed once used: the first step's moments reuse its memory
                    if scaler is not None:
                        scaler.step(optimizer, clip_coef=clip_coef, release_grads=True)
                        scaler.update()
                    else:
                        optimizer.step(clip_coef=clip_coef, release_grads=True)
                    state.loss_sum += step_loss
                    state.losses_seen += 1
                else:
                    state.bad_steps += 1
                    warnings.warn(f"step {state.step + 1}: loss is {step_loss}; skipping this update "
                                  f"({state.bad_steps} in a row)", stacklevel=1)
                    if state.bad_steps >= config.max_bad_steps:
                        raise TrainingError(
                            f"the loss was NaN or infinite for {state.bad_steps} steps in a row (at step {state.step + 1}); "
                            "try a lower --lr, --amp off, or check the data for empty targets")
                optimizer.zero_grad(set_to_none=True)

                state.step += 1
                state.batches_done += len(group)
                state.samples_seen += int(world.sum(sum(len(b) for b in micro_batches), device))
                elapsed = time.perf_counter() - step_start
                state.train_time += elapsed
                # real (unpadded) source and target tokens processed per second
                tokens_per_s = (sum(int(b.attention_mask.sum()) for b in micro_batches) + num_tokens) / elapsed
                log({"step": state.step, "epoch": round(state.epoch + state.batches_done / len(batches), 4),
                         "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tokens_per_s,
                         **({"copy_attention_loss": copy_loss.step_mean} if copy_loss is not None else {})})
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

                epoch_over = state.batches_done >= len(batches)
                if epoch_over:  # the next save must point at the next epoch's first batch
                    state.epoch += 1
                    state.batches_done = 0
                if epoch_over or state.step % eval_every == 0:
                    last_eval = validate()
                if on_step_end is not None:
                    on_step_end(state)
                if epoch_over:
                    break  # the next epoch has its own batch order
            if state.step >= total_steps and (last_eval is None or last_eval["step"] != state.step):
                last_eval = validate()
    bar.close()

    stopped_early = monitor.should_stop and state.step < total_steps
    if monitor.best_step is not None and monitor.best_step != state.step:
        run.restore_weights(run.best, model)  # finish holding the best weights, as saved in best/
    restore_originals(model, originals)  # and in the dtypes the caller passed
    summary = {
        "steps": state.step,
        "epochs": round(state.epoch + state.batches_done / max(len(sampler), 1), 4),
        "train_runtime": round(state.train_time, 3),
        "train_samples_per_second": round(state.samples_seen / state.train_time, 3) if state.train_time else None,
        "train_loss": state.loss_sum / state.losses_seen if state.losses_seen else None,
        "eval_loss": monitor.best,
        "eval_runtime": round(last_eval["eval_runtime"], 3) if last_eval else None,
        "eval_samples_per_second": round(last_eval["eval_samples_per_second"], 3) if last_eval else None,
        "best_step": monitor.best_step,
        "stopped_early": stopped_early,
    }
    log({"step": state.step, "summary": summary})
    return TrainResult(summary, run.read_log() if world.is_main else [])
