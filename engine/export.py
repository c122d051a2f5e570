"""Export a trained model for Transformers, or its LoRA adapter for PEFT.

    python -m engine.export --model runs/medsum --out export/medsum            # RUN_DIR -> RUN_DIR/best
    python -m engine.export --model runs/medsum/last --out export/medsum-last  # any checkpoint dir
    python -m engine.export --model BASE_DIR --adapter ADAPTER_DIR --out DIR   # merge ours or PEFT's adapter
    python -m engine.export --model runs/medsum --adapter-only --out export/medsum-lora

The merged export is a Hugging Face model directory (config.json, generation_config.json,
model.safetensors, tokenizer files) that `transformers.AutoModelForSeq2SeqLM.from_pretrained`
loads; training checkpoints already hold their LoRA merged (in fp32), a base model plus an
adapter is merged here. `--adapter-only` writes the run's adapter as a PEFT adapter
(adapter_config.json, adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on the base
model. Upload either with your own Hugging Face tooling: `hf upload ORG/NAME DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engine.checkpointing import ADAPTER_DIR, RUN_CONFIG, merged_state_dict
from engine.lora import inject_lora, load_adapter
from engine.lora import read_adapter
from engine.peft_adapter import base_model_id, is_peft_adapter, load_peft_adapter, save_peft_adapter
from models.atomic import atomic_directory
from models.checkpoint import find_weights, load_pretrained, write_model_files
from models.config import PRESETS
from models.errors import ModelError
from models.hub import resolve_model_dir
from models.tokenizer import TokenizerError, TokenizerFilesNotFoundError, load_tokenizer


def resolve_checkpoint(model: str) -> str:
    """A run directory stands for its best checkpoint; anything else (model dir, hub id) is itself."""
    path = Path(model).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return model
    if (path / "best" / "config.json").is_file():
        return str(path / "best")
    if (path / RUN_CONFIG).is_file():
        raise ModelError(f"{path}: this run has no best/ checkpoint (it never finished a validation); "
                         f"export {path / 'last'} instead")
    return model


def check_output(out: Path, force: bool, sources: list[Path]) -> None:
    """Never overwrite silently, and never replace a directory the export reads from."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a directory")
    resolved = out.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise ModelError(f"--out {out} would replace {source}, which the export reads; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"{out}: exists and is not empty; pass --force to replace it, or choose another --out")


def load_adapter_any(model: torch.nn.Module, adapter: Path) -> str:
    """Load our adapter or PEFT's into `model` with fp32 LoRA tensors, so the merge is fp32; returns the format."""
    if is_peft_adapter(adapter):
        load_peft_adapter(model, adapter, lora_dtype=torch.float32)
        return "PEFT"
    config, _ = read_adapter(adapter)  # checks the files before the model is changed
    inject_lora(model, config.targets, config.rank, config.alpha, config.dropout, lora_dtype=torch.float32)
    load_adapter(model, adapter)
    return "medsum"


def export_merged(model: str, out: str | Path, adapter: str | Path | None = None, force: bool = False,
                  log=print) -> Path:
    """Write a Hugging Face model directory: the checkpoint as it is, or a base model with `adapter` merged in."""
    out = Path(out)
    name = resolve_checkpoint(model)
    directory = resolve_model_dir(name)
    find_weights(directory)  # a directory without weights fails here, before anything is read
    if adapter is not None and not Path(adapter).is_dir():
        raise ModelError(f"{adapter}: adapter directory not found")
    if adapter is not None and (directory / ADAPTER_DIR).is_dir():
        raise ModelError(f"{directory} is a training checkpoint: its LoRA adapter is already merged into "
                         f"model.safetensors. Export it without --adapter, or pass the base model with --adapter")
    check_output(out, force, [directory] + ([Path(adapter)] if adapter is not None else []))

    net = load_pretrained(directory)
    if adapter is not None:
        fmt = load_adapter_any(net, Path(adapter))
        state = merged_state_dict(net)  # base + B A in fp32, one rounding to the checkpoint's dtype
        log(f"merged the {fmt} adapter {adapter} into {directory}")
    else:
        state = net.state_dict()
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerFilesNotFoundError:
        tokenizer = None
        print(f"note: {directory} has no tokenizer files; the export has none either. Copy tokenizer.json "
              "(or vocab.json + merges.txt) into it before uploading", file=sys.stderr)
    with atomic_directory(out) as tmp:
        write_model_files(tmp, state, net.config)
        if tokenizer is not None:
            tokenizer.save(tmp)
    log(f"wrote a Hugging Face model directory to {out} (from {directory})")
    return out


def find_adapter(model: str | None, adapter: str | None) -> Path:
    """Our adapter directory: --adapter itself, else the `adapter/` of the checkpoint --model names."""
    if adapter is not None:
        path = Path(adapter)
        if not path.is_dir():
            raise ModelError(f"{path}: adapter directory not found")
        if is_peft_adapter(path):
            raise ModelError(f"{path}: is already a PEFT adapter; nothing to convert")
        return path
    if model is None:
        raise ModelError("--adapter-only needs --model RUN_DIR (or a checkpoint dir) or --adapter ADAPTER_DIR")
    checkpoint = Path(resolve_checkpoint(model))
    if not checkpoint.is_dir():
        raise ModelError(f"{model}: no such run or checkpoint directory")
    path = checkpoint / ADAPTER_DIR
    if not path.is_dir():
        raise ModelError(f"{checkpoint}: has no {ADAPTER_DIR}/ directory, so it was not trained with LoRA; "
                         "export the whole model instead (drop --adapter-only)")
    return path


def run_base_model(adapter_dir: Path) -> str | None:
    """The `model` setting of the run the adapter came from (RUN/best/adapter -> RUN/run_config.json)."""
    for parent in adapter_dir.resolve().parents[:2]:
        path = parent / RUN_CONFIG
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")).get("model")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise ModelError(f"{path}: not a readable run config ({exc})") from None
    return None


def export_adapter(out: str | Path, model: str | None = None, adapter: str | None = None,
                   base_model: str | None = None, force: bool = False, log=print) -> Path:
    """Write the run's LoRA adapter as a PEFT adapter directory."""
    out = Path(out)
    source = find_adapter(model, adapter)
    check_output(out, force, [source])
    config, tensors = read_adapter(source)
    if base_model is None:
        run_model = run_base_model(source)
        if run_model in PRESETS:  # built from scratch: random base weights
            print(f"note: the run trained LoRA on {run_model!r} built from scratch, whose base weights exist "
                  "nowhere else; the adapter is of no use without them", file=sys.stderr)
        else:
            base_model = base_model_id(run_model)
    if base_model is None:
        print("note: base_model_name_or_path is left empty; pass --base-model ORG/NAME so PEFT knows which "
              "model the adapter belongs to", file=sys.stderr)
    save_peft_adapter(out, config, tensors, base_model)
    log(f"wrote a PEFT LoRA adapter to {out} (from {source}; r={config.rank}, alpha={config.alpha:g}, "
        f"targets {config.targets}, base model {base_model or 'unknown'})")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run directory (its best/ is used), checkpoint directory, "
                                   "or base model dir / hub id")
    p.add_argument("--adapter", help="LoRA adapter directory (ours or PEFT's) to merge into --model; with "
                                     "--adapter-only, our adapter directory to convert")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter in PEFT's format, not a model")
    p.add_argument("--base-model", help="with --adapter-only: base_model_name_or_path to record "
                                        "(default: the run's --model)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = p.parse_args(argv)
    if not args.adapter_only and args.model is None:
        p.error("--model is required (unless --adapter-only with --adapter)")
    if args.base_model is not None and not args.adapter_only:
        p.error("--base-model only applies to --adapter-only")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.adapter_only:
            export_adapter(args.out, args.model, args.adapter, args.base_model, args.force)
        else:
            export_merged(args.model, args.out, args.adapter, args.force)
    except (ModelError, TokenizerError, FileNotFoundError, ValueError) as exc:
        # lora.py reports bad adapters as ValueError / FileNotFoundError; all are the user's input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
