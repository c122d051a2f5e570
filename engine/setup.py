"""Building what a run needs from its settings: the model and tokenizer, the tokenised splits.

Shared by train.py (a fresh run, a resumed one, each run of a sweep) and evaluate.py, so the
source text, truncation and tokenizer checks are the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from data.batching import TokenizedSplit, tokenize_cached
from data.deid import format_counts, scrub_examples
from data.errors import DataError
from data.records import Example, RecordFormat, load_records
from engine.lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from models import packed_weights
from models.bart import BartForConditionalGeneration, count_parameters
from models.checkpoint import load_pretrained
from models.config import HUB_IDS, PRESETS, preset
from models.errors import ModelError
from models.hub import resolve_model_dir
from models.tokenizer import load_tokenizer, train_bart_tokenizer

DEFAULT_CACHE = Path(os.environ.get("MEDSUM_CACHE", Path.home() / ".cache" / "medsum"))


def add_weight_packs_flag(parser) -> None:
    parser.add_argument("--no-weight-packs", action="store_true",
                        help="keep no oneDNN-packed copies of weights that do not change (models/packed_weights.py): "
                             "the same results, slower on the CPU, with less memory (as much as those weights: "
                             "~0.5 GB at distilbart-cnn-12-6 shapes)")


def apply_weight_packs_flag(args) -> None:
    packed_weights.set_enabled(not args.no_weight_packs)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return device


def load_examples(path: Path, fmt: RecordFormat, deidentify: bool, log=print) -> list[Example]:
    """Validated examples of one split file; skipped records and duplicates are reported, not hidden."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    result = load_records(path, fmt)
    for line in result.warnings():
        log(line)
    examples = result.examples
    if deidentify:
        examples, counts = scrub_examples(examples)
        log(f"{path}: de-identified: {format_counts(counts)}")
    return examples


def tokenize_examples(examples: list[Example], path: Path, fmt: RecordFormat, tokenizer, max_source_len: int,
                      max_target_len: int, deidentify: bool, cache_dir: Path | None, log=print) -> TokenizedSplit:
    # The cache key covers the file's bytes and how records become text; the tokenizer and
    # length limits are added by tokenize_cached.
    key = json.dumps([hashlib.sha256(path.read_bytes()).hexdigest(), fmt.describe(), deidentify])
    split = tokenize_cached([e.source for e in examples], [e.target for e in examples], tokenizer,
                            max_source_len, max_target_len, cache_dir, key)
    if split.sources_truncated or split.targets_truncated:
        log(f"{path}: truncated {split.sources_truncated} of {len(split)} sources to {max_source_len} tokens "
            f"and {split.targets_truncated} targets to {max_target_len}")
    return split


def check_vocabulary(split: TokenizedSplit, vocab_size: int, where: str) -> None:
    """Ids past the embedding table would index out of range deep in the model: say so up front."""
    largest = max((max(ids) for rows in (split.sources, split.targets) for ids in rows if ids), default=0)
    if largest >= vocab_size:
        raise ModelError(f"{where}: the tokenizer produces id {largest}, but the model has only {vocab_size} "
                         "embeddings; the tokenizer does not belong to this model")


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_model(model_name: str, seed: int, train_texts: list[str] | None = None, vocab_size: int | None = None,
                log=print):
    """(model, tokenizer, the model directory or None). A preset name starts from random weights
    (directory None) with a tokenizer trained on `train_texts`; anything else is a model directory
    or hub id with its own tokenizer."""
    if is_preset(model_name):
        config = preset(model_name)
        log(f"building {model_name} from scratch: training a {vocab_size or config.vocab_size}-token tokenizer "
            f"on {len(train_texts)} training texts")
        tokenizer = train_bart_tokenizer(train_texts, vocab_size or config.vocab_size)
        torch.manual_seed(seed)  # the initial weights are a function of the seed (resume rebuilds them)
        model = BartForConditionalGeneration(config.replace(vocab_size=tokenizer.vocab_size))
        return model, tokenizer, None
    directory = resolve_model_dir(model_name)
    model = load_pretrained(directory)
    try:
        tokenizer = load_tokenizer(directory)
    except FileNotFoundError:
        raise ModelError(f"{directory}: has model weights but no tokenizer files (tokenizer.json or "
                         "vocab.json + merges.txt)") from None
    return model, tokenizer, directory


def offline_hint(model_name: str) -> str:
    hub_id = HUB_IDS.get(model_name, model_name)
    return (f"To fine-tune {hub_id}, download it once while online (`hf download {hub_id}`) or pass a local "
            "directory with --model. To try the whole pipeline offline, train the tiny model from scratch: "
            "python train.py --model tiny --full-finetune --lr 1.5e-3 --epochs 3 --batch-size 8 --warmup 100 "
            "--copy-attention 1.0")


def prepare_trainable(model, lora: LoRAConfig | None, freeze_encoder: bool, freeze_embeddings: bool,
                      from_scratch: bool, log=print) -> None:
    """Inject LoRA (or keep every weight trainable), then apply the freezing flags."""
    if lora is not None:
        if from_scratch:
            warnings.warn("LoRA on randomly initialised weights trains only small adapters on noise; "
                          "for a model built from scratch use --full-finetune", stacklevel=2)
        inject_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
        mark_only_lora_trainable(model, lora.train_biases)
    for name, param in model.named_parameters():
        if freeze_encoder and name.startswith("model.encoder.") and "embed_tokens" not in name:
            param.requires_grad_(False)
        if freeze_embeddings and ("shared" in name or "embed_positions" in name):
            param.requires_grad_(False)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    if trainable == 0:
        raise ModelError("nothing left to train: every parameter is frozen")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
