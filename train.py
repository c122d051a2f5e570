"""Fine-tune a BART-family model on JSON medical records.

    python train.py --lr 5e-5 --epochs 3                       # DistilBART + LoRA on data/
    python train.py --model tiny --full-finetune --lr 1e-3     # offline: a tiny model from scratch
    python train.py --lr 1e-5,2e-5,5e-5 --batch-size 8,16      # a grid sweep, best run kept

Writes OUTPUT/last and OUTPUT/best (Hugging Face model directories), OUTPUT/metrics.jsonl and
OUTPUT/run_config.json. `--resume` continues OUTPUT exactly where `last` left it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import DataError
from data.records import add_format_args, find_leakage, format_from_args
from engine.allocator import keep_freed_memory
from engine.checkpointing import RunDir, RunDirError
from engine.distributed import World, from_env
from engine.lora import LoRAConfig
from engine.plots import plot_run, plot_sweep
from engine.setup import (DEFAULT_CACHE, add_weight_packs_flag, apply_weight_packs_flag, build_model,
                          check_vocabulary, is_preset, load_examples, offline_hint, pick_device, prepare_trainable,
                          tokenize_examples)
from engine.sweep import grid, run_sweep
from engine.trainer import AMP_MODES, TrainConfig, TrainingError, train
from models.bart import set_dropout
from models.errors import ModelError
from models.tokenizer import TokenizerError, load_tokenizer

DEFAULT_MODEL = "sshleifer/distilbart-cnn-12-6"
# Settings a resumed run takes from its run_config.json, whatever the command line says.
RUN_SETTINGS = ("model", "data_dir", "lr", "epochs", "max_steps", "batch_size", "grad_accum", "weight_decay",
                "warmup", "schedule", "max_grad_norm", "amp", "eval_every", "patience", "min_delta", "seed",
                "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_train_biases",
                "freeze_encoder", "freeze_embeddings", "max_source_len", "max_target_len", "vocab_size", "dropout",
                "deidentify", "copy_attention", "format", "source_fields", "target_field", "template", "id_field")


def comma_list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model and data")
    io.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model directory, hub id, or a preset trained from scratch (e.g. tiny); default {DEFAULT_MODEL}")
    io.add_argument("--data-dir", default="data", help="directory with train.json and val.json (default: data)")
    io.add_argument("--output-dir", default="runs/medsum", help="where checkpoints and logs go (default: runs/medsum)")
    io.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    io.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    io.add_argument("--max-source-len", type=int, default=512, help="source tokens kept (default: 512)")
    io.add_argument("--max-target-len", type=int, default=256, help="target tokens kept (default: 256)")
    io.add_argument("--deidentify", action="store_true", help="mask e-mails, phones, dates, ... before training")
    io.add_argument("--vocab-size", type=int, help="tokenizer size when training a preset from scratch")
    io.add_argument("--dropout", type=float, help="override the model's dropout (config `dropout`)")
    io.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenised-data cache (default: %(default)s)")
    add_format_args(p)

    opt = p.add_argument_group("optimisation (comma lists for --lr, --batch-size, --weight-decay run a sweep)")
    opt.add_argument("--lr", type=comma_list(float), default=[5e-5], help="peak learning rate (default: 5e-5)")
    opt.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
    opt.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    opt.add_argument("--batch-size", type=comma_list(int), default=[8], help="examples per micro-batch (default: 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    opt.add_argument("--weight-decay", type=comma_list(float), default=[0.01], help="AdamW weight decay (default: 0.01)")
    opt.add_argument("--warmup", type=float, default=0.0, help="warm-up: a fraction of the steps if < 1, else steps")
    opt.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear", help="LR decay after warm-up")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default: 1)")
    opt.add_argument("--copy-attention", type=non_negative, default=0.0, metavar="WEIGHT",
                     help="weight of a guided copy-attention loss: one cross-attention head learns where each "
                          "copied target token sits in the source. Helps a model trained from scratch learn to "
                          "copy (the tiny demo uses 1.0); 0 = off (default)")
    opt.add_argument("--amp", choices=AMP_MODES, default="auto",
                     help="mixed precision: auto = bf16 (fp16 on GPUs without bf16), or bf16/fp16/off")
    opt.add_argument("--seed", type=int, default=0, help="seed for initialisation, dropout and batch order")

    ev = p.add_argument_group("validation and early stopping")
    ev.add_argument("--eval-every", type=int, help="validate every N steps (always at each epoch's end)")
    ev.add_argument("--patience", type=int, default=3, help="validations without improvement before stopping")
    ev.add_argument("--min-delta", type=float, default=0.0, help="smallest validation-loss drop that counts")

    lo = p.add_argument_group("LoRA (on by default)")
    lo.add_argument("--lora", dest="lora", action="store_true", default=True, help="train LoRA adapters (default)")
    lo.add_argument("--full-finetune", dest="lora", action="store_false", help="train every weight instead of LoRA")
    lo.add_argument("--lora-rank", type=int, default=8, help="adapter rank (default: 8)")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha; scaling = alpha/rank (default: 16)")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="dropout before the adapter (default: 0.05)")
    lo.add_argument("--lora-targets", default="q_proj,v_proj", help="module-name suffixes, or all-linear")
    lo.add_argument("--lora-train-biases", action="store_true", help="also train the biases of adapted layers")
    lo.add_argument("--freeze-encoder", action="store_true", help="do not train the encoder")
    lo.add_argument("--freeze-embeddings", action="store_true", help="do not train token/position embeddings")

    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    add_weight_packs_flag(p)
    p.add_argument("--keep-all-runs", action="store_true", help="in a sweep, keep every run's checkpoints")
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RUN_SETTINGS}


def quiet(*args, **kwargs) -> None:
    pass


def train_one(args: argparse.Namespace, output_dir: Path, resume: bool, world: World = World()) -> dict:
    """One training run with scalar lr / batch size / weight decay; returns its summary."""
    log = print if world.is_main else quiet  # one copy of each message, not one per process
    run = RunDir(output_dir)
    if world.is_main:
        run.prepare(resume=resume, overwrite=args.overwrite)
    world.barrier()
    if resume:  # the run's own settings, so it continues exactly as it started
        vars(args).update(run.read_run_config())
        log(f"resuming {output_dir} from its last checkpoint")
    fmt = format_from_args(args)
    data_dir = Path(args.data_dir)
    train_examples = load_examples(data_dir / "train.json", fmt, args.deidentify, log)
    val_examples = load_examples(data_dir / "val.json", fmt, args.deidentify, log)
    leaks = find_leakage({"train": train_examples, "val": val_examples})
    if leaks:
        log(f"warning: {len(leaks)} validation records also appear in the training data; "
            "validation loss will be optimistic")

    # Every rank builds the same model: presets are seeded, and DDP starts from rank 0's weights.
    texts = [t for e in train_examples for t in (e.source, e.target)]
    model, tokenizer, base_dir = build_model(args.model, args.seed, texts, args.vocab_size, log)
    if resume:
        tokenizer = load_tokenizer(run.last)
    lora = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                      args.lora_train_biases) if args.lora else None
    if args.dropout is not None:
        set_dropout(model, args.dropout)
    prepare_trainable(model, lora, args.freeze_encoder, args.freeze_embeddings, base_dir is None, log)
    if resume:
        run.restore_weights(run.last, model)
    elif world.is_main:
        run.write_run_config(run_settings(args))

    cache = Path(args.cache_dir) if args.cache_dir else None
    splits = {}
    for name, examples in (("train", train_examples), ("val", val_examples)):
        path = data_dir / f"{name}.json"
        splits[name] = tokenize_examples(examples, path, fmt, tokenizer, args.max_source_len, args.max_target_len,
                                         args.deidentify, cache if world.is_main else None, log)
        check_vocabulary(splits[name], model.config.vocab_size, str(path))

    config = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, weight_decay=args.weight_decay, warmup=args.warmup,
                         schedule=args.schedule, max_grad_norm=args.max_grad_norm, amp=args.amp,
                         copy_attention=args.copy_attention,
                         eval_every=args.eval_every, patience=args.patience, min_delta=args.min_delta,
                         seed=args.seed, progress=not args.no_progress)
    result = train(model, tokenizer, splits["train"], splits["val"], config, run, pick_device(args.device),
                   lora, resume=resume, world=world, base_dir=base_dir)
    if world.is_main:
        print_summary(result.summary, run)
        plot_run(run.path)
    return result.summary


def print_summary(summary: dict, run: RunDir) -> None:
    print("***** train metrics *****")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}} = {value:.4f}" if isinstance(value, float) else f"  {key:<{width}} = {value}")
    print(f"best checkpoint: {run.best}   last: {run.last}   log: {run.metrics}")


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # steps re-allocate the same big buffers: keep them (engine/allocator.py)
    apply_weight_packs_flag(args)
    try:
        world, args.device = from_env(args.device)
        if len(args.lr) * len(args.batch_size) * len(args.weight_decay) > 1:
            if args.resume:
                raise RunDirError("--resume takes one run; resume a sweep's run with --output-dir SWEEP/runs/NAME")
            if world.distributed:
                raise RunDirError("sweeps run in one process; launch each setting with torchrun separately")
            run_sweep(args, grid(args.lr, args.batch_size, args.weight_decay), train_one)
            plot_sweep(Path(args.output_dir))
        else:
            args.lr, args.batch_size, args.weight_decay = args.lr[0], args.batch_size[0], args.weight_decay[0]
            train_one(args, Path(args.output_dir), args.resume, world)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not is_preset(args.model) and "download" in str(exc):
            print(offline_hint(args.model), file=sys.stderr)
        return 2
    except (DataError, TokenizerError, RunDirError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
