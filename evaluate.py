"""Evaluate a trained model on a data split: loss, perplexity, ROUGE, abbreviation expansion.

    python evaluate.py --split test                  # runs/medsum/best on data/test.json
    python evaluate.py --split test_ood              # specialties never seen in training
    python evaluate.py --model DIR --num-beams 1 --predictions-out preds.jsonl

Generation uses the checkpoint's own settings (generation_config.json) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data.errors import DataError
from data.records import add_format_args, find_leakage, format_from_args, load_records
from engine.allocator import keep_freed_memory
from engine.evaluation import evaluate_loss
from engine.inference import DTYPES, load_for_inference, summarize_ids
from engine.metrics import expansion_accuracy, rouge
from engine.setup import (DEFAULT_CACHE, add_weight_packs_flag, apply_weight_packs_flag, check_vocabulary,
                          load_examples, pick_device, tokenize_examples)
from models.atomic import atomic_write_text
from models.errors import ModelError
from models.tokenizer import TokenizerError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/medsum/best",
                   help="a training output (run dir or checkpoint), any HF model dir, or a hub id (default: %(default)s)")
    p.add_argument("--data-dir", default="data", help="directory holding SPLIT.json (default: data)")
    p.add_argument("--split", default="test", help="evaluate DATA_DIR/SPLIT.json, e.g. test, val, test_ood")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--no-generate", action="store_true", help="teacher-forced loss only, no generation")
    p.add_argument("--metrics-out", help="write the metrics as JSON here")
    p.add_argument("--predictions-out", help="write JSON Lines {id, source, reference, prediction} here")
    p.add_argument("--max-source-len", type=int, default=512, help="source tokens kept (default: 512)")
    p.add_argument("--max-target-len", type=int, default=256, help="reference tokens kept for the loss (default: 256)")
    p.add_argument("--deidentify", action="store_true", help="mask identifiers as training did")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="inference dtype (bf16 is faster)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenised-data cache (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_weight_packs_flag(p)
    g = p.add_argument_group("generation (default: the checkpoint's generation_config.json)")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-length", type=int, help="generated length, decoder start token included")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-length", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--early-stopping", choices=("true", "false", "never"))
    add_format_args(p)
    return p.parse_args(argv)


def generation_overrides(args: argparse.Namespace) -> dict:
    early = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    return {k: v for k, v in dict(num_beams=args.num_beams, max_length=args.max_length,
                                  max_new_tokens=args.max_new_tokens, min_length=args.min_length,
                                  length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                                  early_stopping=early).items() if v is not None}


def report_leakage(data_dir: Path, split_path: Path, examples, fmt) -> None:
    train_path = data_dir / "train.json"
    if split_path.name == "train.json" or not train_path.exists():
        return
    leaks = find_leakage({"train": load_records(train_path, fmt).examples, split_path.stem: examples})
    if leaks:
        print(f"warning: {len(leaks)} records of {split_path} also appear in {train_path}: scores are optimistic",
              file=sys.stderr)


def evaluate(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    fmt = format_from_args(args)
    data_dir = Path(args.data_dir)
    path = data_dir / f"{args.split}.json"
    if not path.exists():
        available = sorted(p.stem for p in data_dir.glob("*.json")) if data_dir.is_dir() else []
        raise DataError(f"{path}: no such split file" + (f"; available: {', '.join(available)}" if available else ""))
    examples = load_examples(path, fmt, args.deidentify)[:args.limit]
    report_leakage(data_dir, path, examples, fmt)

    model, tokenizer, directory = load_for_inference(args.model, device, args.dtype)
    print(f"evaluating {directory} on {path} ({len(examples)} records)")
    split = tokenize_examples(examples, path, fmt, tokenizer, args.max_source_len, args.max_target_len,
                              args.deidentify, Path(args.cache_dir) if args.cache_dir else None)
    if args.limit:  # the cache holds the whole file; keep the records asked for
        split.sources, split.targets = split.sources[:args.limit], split.targets[:args.limit]
    check_vocabulary(split, model.config.vocab_size, str(path))

    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else None
    loss = evaluate_loss(model, split, args.batch_size, device, tokenizer.pad_token_id,
                         model.config.decoder_start_token_id, autocast)
    metrics = {"model": str(directory), "split": args.split, "num_samples": len(examples),
               "eval_loss": loss.loss, "perplexity": loss.perplexity, "eval_runtime": loss.runtime,
               "eval_samples_per_second": loss.samples_per_second}
    if not args.no_generate:
        start = time.perf_counter()
        predictions = summarize_ids(model, tokenizer, split.sources, args.batch_size, device,
                                    progress=not args.no_progress, **generation_overrides(args))
        runtime = time.perf_counter() - start
        references = [e.target for e in examples]
        accuracy, expected = expansion_accuracy(predictions, [e.record.get("expansions") for e in examples])
        metrics.update(rouge(predictions, references))
        metrics.update({
            "gen_len_tokens": sum(len(tokenizer.encode(p)) - 2 for p in predictions) / len(predictions),
            "gen_len_words": sum(len(p.split()) for p in predictions) / len(predictions),
            "abbreviation_expansion_accuracy": accuracy, "expansions_expected": expected,
            "generate_runtime": runtime, "generate_samples_per_second": len(predictions) / runtime,
        })
        if args.predictions_out:
            lines = [json.dumps({"id": e.id, "source": e.source, "reference": e.target, "prediction": p},
                                ensure_ascii=False) + "\n" for e, p in zip(examples, predictions)]
            atomic_write_text(args.predictions_out, "".join(lines))
    print_table(metrics)
    if args.metrics_out:
        atomic_write_text(args.metrics_out, json.dumps(metrics, indent=2) + "\n")
    return metrics


def print_table(metrics: dict) -> None:
    print(f"***** eval metrics: {metrics['split']} *****")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if key in ("model", "split"):
            continue
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        print(f"  {key:<{width}} = {shown}")


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # steps re-allocate the same big buffers: keep them (engine/allocator.py)
    apply_weight_packs_flag(args)
    try:
        evaluate(args)
    except (DataError, ModelError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
