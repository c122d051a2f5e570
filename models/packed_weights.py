"""oneDNN's prepacked copies of Linear weights, made once and reused while a weight is unchanged.

oneDNN multiplies in a blocked weight layout. Given an ordinary row-major weight, every call first
reorders it. For the decoder's per-token products that reorder is a large share of the call:
with 2 threads, a [4096, 1024] fp32 weight against 4 rows takes 0.27 ms unpacked and 0.11 ms
packed, against 16 rows 0.48 against 0.30 ms; bf16 0.14 against 0.07 and 0.24 against 0.15 ms.
At 256 rows and more the gain is ~5%. The product is bit for bit the same; only the reorder is
skipped. Packing that weight once costs ~4 ms (fp32).

The copy costs as much memory as the weight itself: 152M parameters, ~610 MB fp32 (~305 MB bf16),
for distilbart-cnn-12-6's decoder and LM head. So `models.generate` packs only the weights it
runs once per new token, and keeps packs only of frozen weights (`requires_grad=False`, as
`engine.inference.load_for_inference` loads them); trainable weights change between calls.
Bench cases greedy and beam4 (fp32, batch 4, 64 new tokens), two processes against one: greedy
1.57 -> 1.99-2.16 samples/s, beam-4 1.25 -> 1.50-1.56; process peak RSS +625 MB greedy, +450-540
MB beam-4.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import Tensor

# Whether this torch build can prepack: CPU builds with oneDNN on an x86 CPU.
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class _Entry:
    __slots__ = ("weight", "version", "data_ptr", "packed")

    def __init__(self, weight: weakref.ref, version: int, data_ptr: int, packed: Tensor):
        self.weight, self.version, self.data_ptr, self.packed = weight, version, data_ptr, packed


# id(weight) -> its pack. Keyed by id, not by the tensor (a tensor's == compares values); the
# weakref's callback drops the entry when the weight is freed, so a reused id never finds a stale one.
_packs: dict[int, _Entry] = {}


def can_pack(weight: Tensor) -> bool:
    """Packs are kept for Parameters only: a weight cast or computed per call (a LoRA factor in
    another dtype) is a new tensor each time, and packing it would cost more than it saves.
    Inference tensors carry no version counter, so a change to them could not be seen."""
    return (AVAILABLE and isinstance(weight, torch.nn.Parameter) and weight.device.type == "cpu"
            and weight.dim() == 2 and not weight.is_inference())


def prepacked(weight: Tensor) -> Tensor:
    """The packed copy of `weight`, for `torch.ops.mkldnn._linear_pointwise`. Made anew when the
    weight changed since it was packed: an in-place edit (`copy_`, an optimizer step, LoRA's
    merge) bumps the version counter, and `.data = ...` moves the storage."""
    key = id(weight)
    entry = _packs.get(key)
    if (entry is not None and entry.weight() is weight and entry.version == weight._version
            and entry.data_ptr == weight.data_ptr()):
        return entry.packed
    # Outside inference mode, so the pack is an ordinary tensor whatever mode the caller is in.
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _packs[key] = _Entry(weakref.ref(weight, lambda _, key=key: _packs.pop(key, None)),
                         weight._version, weight.data_ptr(), packed)
    return packed


def release(weights: Iterable[Tensor]) -> None:
    """Drop the packs of `weights` (those that have one)."""
    for weight in weights:
        _packs.pop(id(weight), None)


def packed_bytes() -> int:
    """Memory held by all packs now."""
    return sum(e.packed.numel() * e.packed.element_size() for e in _packs.values())
