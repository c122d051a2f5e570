"""The benchmark cases. Each builds both sides on the same weights and batches and returns one
iteration per side as a callable; `measure` alternates them (ours, theirs, ours, theirs, ...).

Ours is the product's own path: `accumulate_gradients` + clip + `engine.optim.AdamW`,
`evaluate_loss`, `generate`, `LengthGroupedSampler` + `collate`. Theirs is what a Transformers
user runs: the model's own loss, `peft.get_peft_model`, `torch.optim.AdamW(fused=True)` (the
Trainer's default optimizer on torch >= 2.8, with its bias/LayerNorm no-decay split),
`model.generate`, `DataCollatorForSeq2Seq` over a random order (the Trainer's default sampler).
Dropout is the config's 0.1, in training mode on both sides; LoRA dropout is 0 on both.

Every case runs on one device, the CPU or a CUDA GPU (`--device`); both sides' models, batches
and autocast live there. On a GPU the generation cases run bf16 weights on both sides (what a
GPU user loads), where on the CPU they run fp32.
"""

from __future__ import annotations

import atexit
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from bench import flops, memory, twins
from bench.shapes import Shapes, at_train_py_batch
from data.batching import LengthGroupedSampler, collate, padding_fraction, tokenize
from engine.evaluation import evaluate_loss
from engine.frozen_weights import hold_frozen_linears_in
from engine.grad_clip import clip_coefficient
from engine.lora import inject_lora, mark_only_lora_trainable
from engine.optim import AdamW, param_groups_for_weight_decay
from engine.trainer import accumulate_gradients
from models.checkpoint import save_pretrained
from models.generate import cast_for_inference, generate

MAX_GRAD_NORM = 1.0
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MTS_TRAINING = DATASETS / "mts-dialog" / "MTS-Dialog-TrainingSet.csv"
# distilbart-cnn-12-6's generation settings; min_length = max_length forces exactly `new_tokens`.
GENERATION = dict(length_penalty=2.0, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0,
                  forced_eos_token_id=2)


class Skip(Exception):
    """The case cannot run here (e.g. the dataset is missing); the message says why."""


@dataclass
class Work:
    samples: int
    tokens: int  # real (unpadded) source + target tokens, or generated tokens
    flops: float  # analytic model FLOPs (bench/flops.py)


@dataclass
class Side:
    run: Callable[[], Work]
    warm: Callable[[], object] | None = None  # the untimed warm-up; `run` when None
    memory: Callable[[], object] | None = None  # the memory pass; `run` when None
    reset: Callable[[], None] | None = None  # drop persistent state (optimizer moments) before it
    state_mb: Callable[[], float] | None = None  # the MB of that state now


@dataclass
class Setup:
    title: str
    dtype: str  # "bf16" or "fp32": the matmul peak that "% of peak" refers to
    iters: int
    sides: dict[str, Side]
    checks: Callable[[], dict] = dict  # sanity facts gathered after the timings
    notes: list[str] = field(default_factory=list)
    warmup: int | None = None  # untimed iterations per side; None: the mode's `warmup`

    def warmups(self, mode_warmup: int) -> int:
        """The untimed iterations each side gets before it is timed or profiled."""
        return mode_warmup if self.warmup is None else self.warmup


# --- the two training steps -------------------------------------------------------------------


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def their_optimizer(model: nn.Module, shapes: Shapes) -> torch.optim.Optimizer:
    """Trainer's grouping: no decay for biases and LayerNorm weights; fused AdamW (its default)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if "bias" in name or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": shapes.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=shapes.lr, fused=True)


class Step:
    optimizer: torch.optim.Optimizer

    def reset(self) -> None:
        """Forget the optimizer moments, so the next step allocates them again (memory pass)."""
        self.optimizer.state.clear()

    def state_mb(self) -> float:
        """The optimizer state's tensors (moments, step counts), in MB."""
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t)) / 2**20


class OurStep(Step):
    """The product's step, as engine.trainer takes it: token-normalised backward, clip's coefficient,
    engine.optim.AdamW scaling each gradient by it as it reads it and freeing it once used."""

    def __init__(self, model, shapes: Shapes, autocast, device: torch.device):
        self.model, self.autocast, self.device, self.params = model, autocast, device, trainable(model)
        self.optimizer = AdamW(param_groups_for_weight_decay(model, shapes.weight_decay), lr=shapes.lr,
                               weight_decay=shapes.weight_decay)

    def __call__(self, batch) -> float:
        loss = accumulate_gradients(self.model, [batch], self.device, self.autocast, None)
        self.optimizer.step(clip_coef=clip_coefficient(self.params, MAX_GRAD_NORM)[1], release_grads=True)
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class TheirStep(Step):
    """What Trainer.training_step + optimizer step do: the model's mean loss, backward, clip, AdamW."""

    def __init__(self, model, shapes: Shapes, autocast):
        self.model, self.autocast, self.params = model, autocast, trainable(model)
        self.optimizer = their_optimizer(model, shapes)

    def __call__(self, batch: dict) -> float:
        with self.autocast or nullcontext():
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def bf16_autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else None


def twin_pair(shapes: Shapes, device: torch.device):
    """(ours, theirs): the same random weights, on `device`."""
    theirs = twins.hf_model(shapes).to(device)
    return twins.our_twin(theirs).to(device), theirs


def lora_pair(shapes: Shapes, device: torch.device):
    """(ours, theirs, theirs' base model) with rank-r LoRA on q_proj and v_proj, base weights frozen.
    Ours holds its frozen Linear weights in bf16, as `train()` does under bf16 autocast when the
    weights came from a model directory: so ours is saved to one first (engine/frozen_weights.py)."""
    ours, base = twin_pair(shapes, device)
    base_dir = Path(tempfile.mkdtemp(prefix="medsum-bench-base-"))
    atexit.register(shutil.rmtree, base_dir, ignore_errors=True)
    save_pretrained(ours, base_dir / "model")
    inject_lora(ours, "q_proj,v_proj", rank=shapes.lora_rank, alpha=shapes.lora_alpha)
    mark_only_lora_trainable(ours)
    if hold_frozen_linears_in(ours, torch.bfloat16, base_dir / "model") is None:
        raise RuntimeError("the frozen weights were not held in bf16")
    theirs = get_peft_model(base, LoraConfig(r=shapes.lora_rank, lora_alpha=shapes.lora_alpha, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM"))
    return ours.train(), theirs.train(), base


def hf_inputs(batch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)


# --- cases -------------------------------------------------------------------------------------


def training(shapes: Shapes, device: torch.device, lora: bool, bf16: bool, watch_head: bool = False) -> Setup:
    """`watch_head`: the checks report the rows of ours' largest LM-head product and of the batch."""
    if lora:
        ours, theirs, _ = lora_pair(shapes, device)
    else:
        ours, theirs = (model.train() for model in twin_pair(shapes, device))
    head_rows: list[int] = []
    if watch_head:
        ours.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(out.shape[0]))
    autocast = bf16_autocast(bf16, device)
    batch = twins.batch_of(twins.synthetic_split(shapes), ours.config).to(device)
    m = flops.Dims.of(ours.config)
    per_sample = (flops.train_lora(m, shapes.source_len, shapes.target_len, shapes.lora_rank) if lora
                  else flops.train_full(m, shapes.source_len, shapes.target_len))
    work = Work(len(batch), twins.real_tokens(batch), per_sample * len(batch))
    ours_step, theirs_step = OurStep(ours, shapes, autocast, device), TheirStep(theirs, shapes, autocast)
    inputs = hf_inputs(batch)

    def run_ours() -> Work:
        ours_step(batch)
        return work

    def run_theirs() -> Work:
        theirs_step(inputs)
        return work

    def checks() -> dict:
        if not watch_head:
            return {}
        return {"our_largest_head_rows": max(head_rows), "target_rows": int((batch.labels != -100).sum())}

    kind = f"LoRA r={shapes.lora_rank} q,v" if lora else "full fine-tune"
    sides = {"ours": Side(run_ours, reset=ours_step.reset, state_mb=ours_step.state_mb),
             "theirs": Side(run_theirs, reset=theirs_step.reset, state_mb=theirs_step.state_mb)}
    return Setup(f"training step, {kind}, {'bf16 autocast' if bf16 else 'fp32'}", "bf16" if bf16 else "fp32",
                 shapes.lora_iters if lora else shapes.train_iters, sides, checks,
                 warmup=None if lora else shapes.train_warmup)


def lora_long(shapes: Shapes, device: torch.device) -> Setup:
    """The LoRA bf16 step at train.py's default batch rather than the reference one (full mode:
    8 x 512/256 tokens, 2048 target rows), timed over `train_iters` steps since each takes
    seconds. Its checks give the most rows one of ours' LM-head products took."""
    long = at_train_py_batch(shapes)
    setup = training(long, device, lora=True, bf16=True, watch_head=True)
    setup.title += f", train.py's batch ({long.batch_size} x {long.source_len}/{long.target_len} tokens)"
    return setup


def evaluation(shapes: Shapes, device: torch.device, precision: str = "bf16", batches: int = 1) -> Setup:
    """`precision` "bf16": ours is validation inside train.py (fp32 weights under bf16 autocast);
    "bf16_weights": evaluate.py --dtype bf16, which loads the model through `cast_for_inference`;
    "fp32": evaluate.py's default. Theirs is Trainer's evaluation, with bf16=True (autocast over
    fp32 weights) for both bf16 cases and without it for fp32. An iteration evaluates a split of
    `batches` batches: ours in one `evaluate_loss` call, theirs batch by batch, each under its own
    autocast as Trainer's prediction_step runs it (train.py validates 320 records, 40 batches, by default)."""
    ours, theirs = (model.eval() for model in twin_pair(shapes, device))
    if precision == "bf16_weights":
        cast_for_inference(ours, torch.bfloat16)
    elif precision == "fp32":
        ours.requires_grad_(False)  # frozen, as load_for_inference loads it
    autocast = bf16_autocast(precision != "fp32", device)
    config = ours.config
    split = twins.synthetic_split(shapes, n=shapes.batch_size * batches)
    parts = [collate(split, range(start, start + shapes.batch_size), config.pad_token_id,
                     config.decoder_start_token_id).to(device) for start in range(0, len(split), shapes.batch_size)]
    m = flops.Dims.of(config)
    work = Work(len(split), sum(twins.real_tokens(batch) for batch in parts),
                flops.evaluate(m, shapes.source_len, shapes.target_len) * len(split))
    losses = {}
    their_inputs = [hf_inputs(batch) for batch in parts]

    def run_ours() -> Work:
        report = evaluate_loss(ours, split, shapes.batch_size, device, config.pad_token_id,
                               config.decoder_start_token_id, autocast)
        losses["ours"] = report.loss
        return work

    def run_theirs() -> Work:
        # what Trainer.prediction_step does per batch: no_grad, autocast if bf16, the model's own
        # loss; every batch has as many target tokens, so the mean of the batch means is the split's
        batch_losses = []
        for inputs in their_inputs:
            with torch.no_grad(), autocast or nullcontext():
                batch_losses.append(float(theirs(**inputs).loss))
        losses["theirs"] = statistics.fmean(batch_losses)
        return work

    def checks() -> dict:
        return {"loss_ours": losses["ours"], "loss_theirs": losses["theirs"],
                "loss_rel_diff": abs(losses["ours"] - losses["theirs"]) / abs(losses["theirs"])}

    title = {"bf16": "evaluation loss (teacher forced), bf16 autocast",
             "bf16_weights": "evaluation loss (teacher forced), bf16: ours evaluate.py --dtype bf16 (bf16 weights + "
                             "autocast), theirs autocast",
             "fp32": "evaluation loss (teacher forced), fp32 (evaluate.py's default)"}[precision]
    if batches > 1:
        title += f", a split of {batches} batches per iteration (train.py's validation)"
    sides = {"ours": Side(run_ours), "theirs": Side(run_theirs)}
    return Setup(title, "bf16" if autocast else "fp32", shapes.eval_iters, sides, checks)


def generation(shapes: Shapes, device: torch.device, beams: int) -> Setup:
    ours, theirs = twin_pair(shapes, device)
    theirs.eval()
    ours.eval().requires_grad_(False)  # frozen, as load_for_inference loads it
    dtype = "fp32"
    if device.type == "cuda":  # bf16 weights, as `--dtype bf16` / `torch_dtype=torch.bfloat16` load them
        dtype = "bf16"
        theirs.to(torch.bfloat16)
        cast_for_inference(ours, torch.bfloat16)
    batch = twins.batch_of(twins.synthetic_split(shapes), ours.config).to(device)
    settings = dict(GENERATION, num_beams=beams, max_length=shapes.new_tokens + 1,
                    min_length=shapes.new_tokens + 1)
    m = flops.Dims.of(ours.config)
    work = Work(len(batch), len(batch) * shapes.new_tokens,
                flops.generate(m, shapes.source_len, shapes.new_tokens, beams) * len(batch))
    outputs = {}

    def run_ours() -> Work:
        outputs["ours"] = generate(ours, batch.input_ids, batch.attention_mask, **settings)
        return work

    def run_theirs() -> Work:
        outputs["theirs"] = theirs.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            do_sample=False, **settings)
        return work

    def checks() -> dict:
        a, b = outputs["ours"], outputs["theirs"]
        return {"same_output": bool(a.shape == b.shape and torch.equal(a, b)), "output_shape": list(a.shape)}

    name = "greedy" if beams == 1 else f"beam-{beams}"
    return Setup(f"{name} generation, {shapes.new_tokens} new tokens, {dtype}", dtype, shapes.generate_iters,
                 {"ours": Side(run_ours), "theirs": Side(run_theirs)}, checks)


def mts_dialog_split(shapes: Shapes):
    """`real_records` MTS-Dialog training records (a seeded sample) as token ids, plus the tokenizer."""
    if not MTS_TRAINING.is_file():
        raise Skip(f"{MTS_TRAINING} not found (the shared datasets folder is missing)")
    from data.import_mts_dialog import convert
    from models.tokenizer import train_bart_tokenizer

    records, _, _ = convert([MTS_TRAINING])
    # The corpus is too small for a 50k-token BPE; ids of a smaller one are valid ids of the model.
    tokenizer = train_bart_tokenizer([r["dialogue"] for r in records] + [r["summary"] for r in records],
                                     vocab_size=min(shapes.tokenizer_vocab, shapes.vocab_size))
    chosen = random.Random(0).sample(records, shapes.real_records)
    split = tokenize([r["dialogue"] for r in chosen], [r["summary"] for r in chosen], tokenizer,
                     shapes.real_max_source, shapes.real_max_target)
    return split, tokenizer


def real_epoch(shapes: Shapes, device: torch.device) -> Setup:
    split, tokenizer = mts_dialog_split(shapes)
    ours, theirs, base = lora_pair(shapes, device)
    autocast = bf16_autocast(True, device)
    config = ours.config
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    collator = transformers.DataCollatorForSeq2Seq(hf_tokenizer, model=base, label_pad_token_id=-100)
    features = [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t}
                for s, t in zip(split.sources, split.targets)]
    sampler = LengthGroupedSampler(split.lengths(), shapes.batch_size, seed=0)
    bs = shapes.batch_size

    def their_batches(epoch: int) -> list[list[int]]:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    m = flops.Dims.of(config)
    tokens = sum(len(s) + len(t) for s, t in zip(split.sources, split.targets))
    work = Work(len(split), tokens, sum(flops.train_lora(m, len(s), len(t), shapes.lora_rank)
                                        for s, t in zip(split.sources, split.targets)))
    ours_step, theirs_step = OurStep(ours, shapes, autocast, device), TheirStep(theirs, shapes, autocast)
    epochs = {"ours": 0, "theirs": 0}

    def run_ours() -> Work:
        for indices in sampler.epoch_batches(epochs["ours"]):
            ours_step(collate(split, indices, config.pad_token_id, config.decoder_start_token_id))
        epochs["ours"] += 1
        return work

    def run_theirs() -> Work:
        for indices in their_batches(epochs["theirs"]):
            theirs_step(collator([features[i] for i in indices]).to(device))
        epochs["theirs"] += 1
        return work

    def padded_size(indices: list[int]) -> int:
        longest_source = max(len(split.sources[i]) for i in indices)
        return len(indices) * (longest_source + max(len(split.targets[i]) for i in indices))

    first = sampler.epoch_batches(0)[0]
    ours_largest = max(sampler.epoch_batches(0), key=padded_size)
    theirs_largest = max(their_batches(0), key=padded_size)

    def step_ours(indices: list[int]) -> Callable[[], None]:
        return lambda: ours_step(collate(split, indices, config.pad_token_id, config.decoder_start_token_id))

    def step_theirs(indices: list[int]) -> Callable[[], None]:
        return lambda: theirs_step(collator([features[i] for i in indices]).to(device))

    def checks() -> dict:
        return {"records": len(split), "real_tokens": tokens,
                "padding_ours": padding_fraction(split, sampler.epoch_batches(0)),
                "padding_theirs": padding_fraction(split, their_batches(0)),
                "source_len_max": max(len(s) for s in split.sources),
                "source_len_median": statistics.median(len(s) for s in split.sources)}

    return Setup(f"real-length epoch: {len(split)} MTS-Dialog records, LoRA bf16, batch {bs}", "bf16",
                 shapes.real_epochs,
                 {"ours": Side(run_ours, step_ours(first), step_ours(ours_largest), ours_step.reset),
                  "theirs": Side(run_theirs, step_theirs(first), step_theirs(theirs_largest), theirs_step.reset)},
                 checks, notes=["warm-up: one step on one batch per side; an iteration is one whole epoch; "
                                "memory: one step on the side's largest padded batch of the epoch"])


CASES: dict[str, Callable[[Shapes, torch.device], Setup]] = {
    "lora_bf16": lambda s, d: training(s, d, lora=True, bf16=True),
    "lora_bf16_long": lora_long,
    "full_bf16": lambda s, d: training(s, d, lora=False, bf16=True),
    "full_fp32": lambda s, d: training(s, d, lora=False, bf16=False),
    "eval_bf16": evaluation,
    "eval_bf16_split": lambda s, d: evaluation(s, d, "bf16", batches=s.eval_split_batches),
    "eval_bf16_weights": lambda s, d: evaluation(s, d, "bf16_weights"),
    "eval_fp32": lambda s, d: evaluation(s, d, "fp32"),
    "beam4": lambda s, d: generation(s, d, beams=4),
    "greedy": lambda s, d: generation(s, d, beams=1),
    "real_epoch": real_epoch,
}


# --- measuring ---------------------------------------------------------------------------------


def measure(setup: Setup, warmup: int, device: torch.device = torch.device("cpu")) -> dict:
    """Warm-ups (`setup.warmup` if set, else `warmup`), then timed iterations with the sides
    alternated, then one memory pass per side. The warm-ups' times are kept too (`warmup_s`).

    On a GPU each timed iteration starts and ends with the device idle (synchronised), so its
    wall time is the work's, queued kernels included.

    Memory: the side's persistent state is dropped (optimizer moments), freed memory is handed
    back (heap pages to the kernel; the CUDA caching allocator's blocks), the high-water mark is
    reset, and one iteration runs; its peak minus the memory in use just before it is the
    side's memory (activations, gradients, optimizer state, temporaries; not the shared
    weights). On the CPU that is resident memory (RSS); on a GPU, the device memory PyTorch
    allocated. Every lazy one-time initialisation has happened by then, on both sides.

    A side with persistent state first gets the same pass with its state kept (`steady_peak_mb`):
    what every step after the first adds on top of weights and moments. A training run's peak
    over its weights (`run_peak_mb`) is the larger of the first step's and a later step's plus
    the state (`state_mb`, the moments' tensors), since the moments outlive every step.
    """
    cuda = device.type == "cuda"

    def timed(iteration: Callable[[], object], into: list[float]):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = iteration()
        if cuda:
            torch.cuda.synchronize(device)
        into.append(time.perf_counter() - start)
        return result

    times = {name: [] for name in setup.sides}
    warmup_times = {name: [] for name in setup.sides}
    work = {}
    for _ in range(setup.warmups(warmup)):
        for name, side in setup.sides.items():
            timed(side.warm or side.run, warmup_times[name])
    for _ in range(setup.iters):
        for name, side in setup.sides.items():
            work[name] = timed(side.run, times[name])

    peaks, steady_peaks, states, run_peaks = {}, {}, {}, {}
    for name, side in setup.sides.items():
        steady_peaks[name] = states[name] = None
        if side.reset is not None:
            steady_peaks[name] = memory_pass(side, device)
            states[name] = side.state_mb() if side.state_mb is not None else None
            side.reset()
        peaks[name] = memory_pass(side, device)
        run_peaks[name] = (max(peaks[name], steady_peaks[name] + states[name])
                           if None not in (peaks[name], steady_peaks[name], states[name]) else None)

    out = {}
    for name in setup.sides:
        median = statistics.median(times[name])
        w = work[name]
        out[name] = {"seconds": times[name], "warmup_s": warmup_times[name], "median_s": median,
                     "samples_per_s": w.samples / median, "tokens_per_s": w.tokens / median,
                     "flops": w.flops, "flops_per_s": w.flops / median,
                     "peak_mb": peaks[name], "steady_peak_mb": steady_peaks[name], "state_mb": states[name],
                     "run_peak_mb": run_peaks[name]}
    return out


def memory_pass(side: Side, device: torch.device) -> float | None:
    """MB one iteration of `side` adds at its peak over what was in use before it (see `measure`);
    None, without running it, where the kernel cannot reset the CPU high-water mark."""
    iteration = side.memory or side.run
    memory.release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
        iteration()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    try:
        memory.reset_peak()
    except OSError:  # no /proc/self/clear_refs to write (some containers)
        return None
    base = memory.rss_mb()
    iteration()
    return memory.peak_mb() - base
