"""A training run's directory: `last/` and `best/` checkpoints, the metrics log, the run's settings.

Each checkpoint is a Hugging Face model directory (config, generation config, safetensors
weights with LoRA merged in, tokenizer files) so evaluate.py, Transformers and the exporter read
it as it is. A LoRA run adds `adapter/` (the unmerged adapter, what resuming needs: the base
weights are rebuilt from the run's `--model`); `last/` adds `training_state.pt`: optimizer,
gradient scaler, early-stopping monitor, RNG states and the position in the data. Every
checkpoint is written to a temporary directory and swapped in whole, so a crash during a save
leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.frozen_weights import FrozenOriginals, with_originals
from engine.lora import LoRAConfig, load_adapter, lora_layers, save_adapter
from models.atomic import atomic_directory, atomic_write, atomic_write_text, recover_directory
from models.checkpoint import load_state_dict_from_dir, write_model_files

TRAINING_STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
ADAPTER_DIR = "adapter"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume/--overwrite, or is damaged)."""


def merged_state_dict(model: torch.nn.Module, originals: FrozenOriginals | None = None) -> dict[str, torch.Tensor]:
    """The model's weights as a plain BART state dict: LoRA updates folded in (fp32), adapter keys gone.

    Computed beside the model, which keeps training unmerged. Weights the run holds in bf16 get
    their fp32 `originals` back first (engine/frozen_weights.py).
    """
    state = with_originals(dict(model.state_dict()), originals)
    for name, layer in lora_layers(model):
        del state[f"{name}.lora_a"], state[f"{name}.lora_b"]
        if not layer.merged:
            base = state[f"{name}.weight"]
            state[f"{name}.weight"] = (base.detach().float() + layer.delta_weight()).to(base.dtype)
    return state


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.last = self.path / "last"
        self.best = self.path / "best"
        self.metrics = self.path / METRICS
        self.run_config = self.path / RUN_CONFIG

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Never overwrite a run silently: continue it (resume), replace it (overwrite), or refuse."""
        for checkpoint in (self.last, self.best):
            recover_directory(checkpoint)
        exists = self.path.exists() and any(self.path.iterdir())
        if resume:
            if not (self.last / TRAINING_STATE).exists():
                raise RunDirError(f"{self.path}: nothing to resume (no last/{TRAINING_STATE}); "
                                  "start a new run without --resume")
            return
        if exists and not overwrite:
            raise RunDirError(f"{self.path} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --output-dir")
        if exists:
            for child in (self.last, self.best, self.metrics, self.run_config):
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.exists():
                    child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def save(self, which: Path, model, tokenizer, lora_config: LoRAConfig | None,
             training_state: dict | None = None, originals: FrozenOriginals | None = None) -> None:
        with atomic_directory(which) as tmp:
            write_model_files(tmp, merged_state_dict(model, originals), model.config)
            tokenizer.save(tmp)
            if lora_config is not None:
                save_adapter(model, tmp / ADAPTER_DIR, lora_config)
            if training_state is not None:
                torch.save(training_state, tmp / TRAINING_STATE)

    def load_training_state(self) -> dict:
        # Our own file, still read without unpickling arbitrary objects.
        return torch.load(self.last / TRAINING_STATE, map_location="cpu", weights_only=True)

    def restore_weights(self, which: Path, model) -> None:
        """Put the weights of checkpoint `which` back into the (training) model."""
        if any(True for _ in lora_layers(model)):
            load_adapter(model, which / ADAPTER_DIR)
            return
        # The file stores the tied embedding once; strict loading would miss its other names.
        missing, unexpected = model.load_state_dict(load_state_dict_from_dir(which), strict=False)
        if unexpected:
            raise RunDirError(f"{which}: unexpected tensors {', '.join(unexpected)}")

    def write_run_config(self, settings: dict) -> None:
        atomic_write_text(self.run_config, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def read_run_config(self) -> dict:
        return json.loads(self.run_config.read_text(encoding="utf-8"))

    def log(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """On resume, drop log lines from steps after the checkpoint: they will be run again."""
        if not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.metrics, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))

    def read_log(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
