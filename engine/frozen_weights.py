"""Frozen Linear weights held in the autocast dtype while training; the fp32 originals stay on disk.

Under bf16 autocast every forward pass casts each frozen Linear weight to bf16 again, and keeps
the copy for backward. A LoRA run at distilbart-cnn-12-6 shapes has ~240M such weights: ~480 MB
of casts made and held in every step, on top of the fp32 weights themselves. Holding those
weights in bf16 from the start trains bit for bit the same (autocast's cast is the same
round-to-nearest) with neither the casts nor the fp32 copies in memory.

A frozen weight tied to another reader (the LM head is the embedding, which the lookups read in
fp32) stays fp32, and gets a held bf16 copy for its product instead
(`packed_weights.hold_autocast_copy`): autocast's cast, made once per run instead of per step.

What a run saves must not change: the merged checkpoint is the fp32 base plus the adapter, as a
run holding fp32 weights writes it. So the fp32 originals are read back, one tensor at a time,
from the checkpoint the run started from: when a checkpoint is saved, and when training ends
(the caller gets its model back in the dtypes it passed). Runs from scratch have no such file and
keep their fp32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.lora import LoRALinear
from models import packed_weights
from models.checkpoint import read_tensors


@dataclass
class FrozenOriginals:
    """Where the fp32 values of the weights held in a lower dtype live."""
    directory: Path
    names: list[str]  # state-dict keys of the weights held in the lower dtype

    def read(self) -> dict[str, Tensor]:
        return {name: t.to(torch.float32) for name, t in read_tensors(self.directory, self.names).items()}


def hold_frozen_linears_in(model: nn.Module, dtype: torch.dtype, source: str | Path) -> FrozenOriginals | None:
    """Put every frozen fp32 Linear weight of `model` in `dtype`, if `source` (the model directory the
    weights were loaded from) still holds their exact values; None when nothing was changed. Tied
    weights (the LM head is the embedding) stay fp32 and get a held `dtype` copy for the product."""
    appearances: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        appearances[id(p)] = appearances.get(id(p), 0) + 1
    frozen = {f"{name}.weight": module for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, LoRALinear)) and not module.weight.requires_grad
              and module.weight.dtype == torch.float32}
    layers = {name: module for name, module in frozen.items() if appearances[id(module.weight)] == 1}
    tied = [module.weight for module in frozen.values() if appearances[id(module.weight)] > 1]
    if not layers:
        return None
    originals = FrozenOriginals(Path(source), sorted(layers))
    # Only if the file holds exactly these values (a caller may have changed weights after loading).
    if not all(torch.equal(layers[name].weight, value.to(layers[name].weight.device))
               for name, value in originals.read().items()):
        return None
    for module in layers.values():
        module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    # The forward's products then skip oneDNN's reorder of these weights in every call.
    packed_weights.pack_for_linear(module.weight for module in layers.values())
    for weight in tied:
        packed_weights.hold_autocast_copy(weight, dtype)
    return originals


def with_originals(state: dict[str, Tensor], originals: FrozenOriginals | None) -> dict[str, Tensor]:
    """A state dict with the weights held in a lower dtype replaced by their fp32 originals (on
    the device of the tensors they replace)."""
    if originals is None:
        return state
    return {**state, **{name: t.to(state[name].device) for name, t in originals.read().items()}}


def restore_originals(model: nn.Module, originals: FrozenOriginals | None) -> None:
    """Give the weights held in a lower dtype their fp32 values back, and drop the held copies of
    tied ones."""
    if originals is None:
        return
    packed_weights.release(model.parameters())
    for name, tensor in originals.read().items():
        module = model.get_submodule(name.rpartition(".")[0])
        module.weight = nn.Parameter(tensor.to(module.weight.device), requires_grad=False)
