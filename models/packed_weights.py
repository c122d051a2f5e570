"""oneDNN's prepacked copies of Linear weights, made once and reused while a weight is unchanged.

oneDNN multiplies in a blocked weight layout. Given an ordinary row-major weight, every call first
reorders it. For the decoder's per-token products that reorder is a large share of the call:
with 2 threads, a [4096, 1024] fp32 weight against 4 rows takes 0.27 ms unpacked and 0.11 ms
packed, against 16 rows 0.48 against 0.30 ms; bf16 0.14 against 0.07 and 0.24 against 0.15 ms.
At 256 rows and more the gain is ~5%. Packing that weight once costs ~4 ms (fp32).

Only the reorder is skipped, but oneDNN may pick other kernels for a pack. On this project's AMD
EPYC (avx512_bf16) every product measured was bit for bit the plain weight's. On an Intel Xeon
with AMX (an H100 host) they were not always: at distilbart-cnn-12-6 shapes, under 0.05% of the
elements of bf16 products at 16 rows (and at 300 rows for [1024, 1024]) differed from `F.linear`'s,
with the same error against float64 (another summation order). fp32 products (fp32 packs are
made by generation and used only where no gradient is needed) differed from the plain weight's
at 1-16 rows: relative error against float64 ~4e-7 packed, ~1.5e-7 plain. Runs stay
deterministic (the same weights get the same pack); only switching packs off (`set_enabled`) may
change the last bits there.

A pack costs as much memory as its weight, so only weights that stay unchanged get one:
- Generation (`models.generate`) packs the weights it runs once per new token, the decoder's and
  the LM head's: 152M parameters, ~610 MB fp32 (~305 MB bf16) for distilbart-cnn-12-6. It keeps
  the packs of frozen weights (`requires_grad=False`, as `engine.inference.load_for_inference`
  loads them) and drops the others after each call; later fp32 products without a gradient
  (evaluate.py's loss pass) run on the kept ones too. Bench cases greedy and beam4 (fp32, batch 4,
  64 new tokens), two processes against one: greedy 1.57 -> 1.99-2.16 samples/s, beam-4 1.25 ->
  1.50-1.56; process peak RSS +625 MB greedy, +450-540 MB beam-4.
- `cast_for_inference(model, torch.bfloat16)` (evaluate.py and summarize.py `--dtype bf16`) packs
  every Linear weight: ~610 MB for distilbart-cnn-12-6. Bench case eval_bf16_weights, three
  process pairs: ours/theirs 1.16-1.18x -> 1.25-1.30x, the same loss; process peak +560-600 MB.
- Training packs the frozen Linear weights it holds in bf16 (engine/frozen_weights.py): the
  LoRA base, ~240M parameters, ~480 MB at distilbart-cnn-12-6 shapes. Bench case lora_bf16,
  six process pairs: ours/theirs 1.254-1.281x -> 1.298-1.376x; process peak RSS +490 MB,
  per-step memory unchanged.
- Validation in train.py under bf16 autocast (`engine.evaluation.evaluate_loss` over more than
  one batch) packs the bf16 cast of every fp32 Linear weight for the pass (`packed_casts`) and
  drops the packs after it: autocast would cast each weight (and oneDNN reorder the cast) in every
  batch. Making the packs takes ~0.18 s at distilbart-cnn-12-6 shapes; an evaluation batch of
  4 x 256/64 tokens went ~0.78 -> ~0.70 s over a 4-batch split (in-process A/B, medians). Bench
  case eval_bf16_split (8 batches): 1.29x theirs, where one batch (eval_bf16) reads 1.13x; the
  pass holds ~610 MB of packs (peak 803 against theirs' 839 MB, which holds autocast's casts
  for one batch at a time). In a full fine-tune that is less than the fp32 gradients (~1.2 GB)
  every step holds and frees before validating; LoRA's frozen weights are bf16 already and get
  no pack here.

A frozen weight that must stay fp32 for another reader (the LM head is the embedding) can get a
held copy in the autocast dtype instead (`hold_autocast_copy`): under that autocast, `linear`
multiplies with the copy, and its pack, rather than casting the fp32 weight in every call. The
copy is autocast's own cast, made once, so the numbers are the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import autocast_linear, onednn_linear

# Whether this torch build can prepack: CPU builds with oneDNN on an x86 CPU.
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# Whether bf16 F.linear runs on oneDNN here, so a bf16 pack gives its bits. Elsewhere (no avx512
# bf16) torch multiplies bf16 on its own kernels, in another summation order.
BF16_AVAILABLE = AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class _Entry:
    """What was made from a weight (its pack, or a held copy), and the weight's state back then."""
    __slots__ = ("weight", "version", "data_ptr", "made")

    def __init__(self, weight: Tensor, made: Tensor, registry: dict[int, _Entry]):
        key = id(weight)
        # the weakref's callback drops the entry when the weight is freed
        self.weight = weakref.ref(weight, lambda _: registry.pop(key, None))
        self.version, self.data_ptr, self.made = weight._version, weight.data_ptr(), made
        registry[key] = self

    def is_current(self, weight: Tensor) -> bool:
        """Made from this very weight, unchanged since: an in-place edit (`copy_`, an optimizer
        step, LoRA's merge) bumps the version counter, and `.data = ...` moves the storage."""
        return self.weight() is weight and self.version == weight._version and self.data_ptr == weight.data_ptr()


# Off with `set_enabled(False)` (the scripts' --no-weight-packs): no weight gets a pack then.
_enabled = True

# id(weight) -> its pack. Keyed by id, not by the tensor (a tensor's == compares values); an
# entry goes with its weight, so a reused id never finds a stale one.
_packs: dict[int, _Entry] = {}
# id(fp32 weight) -> its held copy in an autocast dtype (`hold_autocast_copy`)
_copies: dict[int, _Entry] = {}
# id(fp32 weight) -> the pack of its bf16 cast, while a `packed_casts` block runs
_cast_packs: dict[int, _Entry] = {}


def set_enabled(enabled: bool) -> None:
    """Turn packing on or off for the whole process; off also frees the packs made so far.
    Everything then runs as it would without packs, in the same numbers, with less memory."""
    global _enabled
    _enabled = enabled
    if not enabled:
        _packs.clear()


def can_pack(weight: Tensor) -> bool:
    """Packs are kept for Parameters only: a weight cast or computed per call (a LoRA factor in
    another dtype) is a new tensor each time, and packing it would cost more than it saves.
    Inference tensors carry no version counter, so a change to them could not be seen."""
    return (_enabled and AVAILABLE and isinstance(weight, torch.nn.Parameter) and weight.device.type == "cpu"
            and weight.dim() == 2 and not weight.is_inference())


def prepacked(weight: Tensor) -> Tensor:
    """The packed copy of `weight`, for `onednn_linear.product`. Made anew when the
    weight changed since it was packed (`_Entry.is_current`)."""
    entry = _packs.get(id(weight))
    if entry is not None and entry.is_current(weight):
        return entry.made
    return _Entry(weight, _reorder(weight), _packs).made


def _reorder(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """oneDNN's blocked copy of `weight` (cast to `dtype` first, if given). Made outside inference
    mode, so the pack is an ordinary tensor whatever mode the caller is in."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype or weight.dtype))


class _PackedLinear(torch.autograd.Function):
    """x W^T + b on the pack, for a frozen weight: the only gradient is the input's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return onednn_linear.product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        # The product F.linear's backward computes for its input, on the same kernel: the same bits.
        grad_x = grad.reshape(-1, grad.shape[-1]).mm(weight).view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None


def usable_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """The pack `linear` runs on, if the weight was given one; else None. A bf16 pack when the
    product runs in bf16 (bf16 inputs, or CPU bf16 autocast), x is contiguous, and the weight and
    bias need no gradient. An fp32 pack (generation makes them) only where no gradient is needed at
    all: with one, `onednn_linear` would compute the input gradient on the plain weight, and a
    training step must not change its numbers after a generate call."""
    if id(weight) not in _packs:
        return None
    if weight.device.type != "cpu":  # `Module.to("cuda")` keeps the Parameter: its CPU pack is dead weight
        _packs.pop(id(weight), None)
        return None
    if weight.dtype == torch.float32:
        if (not onednn_linear.eligible(x, weight, bias) or not x.is_contiguous()
                or onednn_linear.needs_grad(x, weight, bias)):
            return None
        return prepacked(weight)
    if (weight.dtype != torch.bfloat16 or not BF16_AVAILABLE
            or x.device.type != "cpu" or not x.is_contiguous()):  # strided: F.linear adds the bias apart
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if torch.is_autocast_enabled("cpu"):  # it casts fp32 x and bias to its dtype, nothing else
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return None
    elif x.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
        return None  # F.linear then gives its dtype error
    # Packed afresh if the weight changed since (DDP's start-up broadcast, LoRA's merge).
    return prepacked(weight)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` on the weight's pack where `usable_pack` finds one: bit for bit where oneDNN runs
    the pack on the plain weight's kernels (see the module docstring for where it does not)."""
    packed = cast_pack(x, weight, bias) if _cast_packs else None
    if packed is None:
        copy = autocast_copy(x, weight) if _copies else None
        if copy is not None:
            weight = copy
        packed = usable_pack(x, weight, bias)
    if packed is None:
        if onednn_linear.runs(x, weight, bias):
            return onednn_linear.linear(x, weight, bias)
        if autocast_linear.runs(x, weight, bias):
            return autocast_linear.linear(x, weight, bias)
        return F.linear(x, weight, bias)
    # What autocast does for F.linear: x and the bias in bf16 (a no-op when they already are, and for fp32).
    x = x.to(packed.dtype)
    bias = None if bias is None else bias.to(packed.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PackedLinear.apply(x, weight, bias, packed)
    return onednn_linear.product(x, packed, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that runs on its weight's pack when it has one."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def pack_for_linear(weights: Iterable[Tensor]) -> None:
    """Pack each of `weights` that `linear` would run on: bf16 ones, where oneDNN runs bf16. Others
    would only get a pack nothing reads."""
    for weight in weights:
        if weight.dtype == torch.bfloat16 and BF16_AVAILABLE and can_pack(weight):
            prepacked(weight)


def linear_weights(model: nn.Module) -> list[Tensor]:
    """Every Linear weight of `model`: a 2-D weight outside an embedding, LoRA's base included."""
    return [module.weight for module in model.modules()
            if not isinstance(module, nn.Embedding) and isinstance(getattr(module, "weight", None), Tensor)
            and module.weight.dim() == 2]


def pack_linears(model: nn.Module) -> None:
    """`pack_for_linear` over every Linear weight of `model`."""
    pack_for_linear(linear_weights(model))


def pack_fp32_for_inference(weights: Iterable[Tensor]) -> None:
    """Pack each fp32 one of `weights` for the products `linear` runs on oneDNN without a gradient
    (generation's per-token products, where the pack pays most)."""
    for weight in weights:
        if weight.dtype == torch.float32 and onednn_linear.AVAILABLE and can_pack(weight):
            prepacked(weight)


def release(weights: Iterable[Tensor]) -> None:
    """Drop the packs and held copies of `weights` (those that have one)."""
    for weight in weights:
        _packs.pop(id(weight), None)
        _copies.pop(id(weight), None)  # the copy's own pack goes with the copy


def hold_autocast_copy(weight: Tensor, dtype: torch.dtype) -> None:
    """Keep a frozen `dtype` copy of the frozen `weight` (packed where `linear` runs `dtype` on
    packs) for `linear` to use under `dtype` autocast (`autocast_copy`): autocast's cast, made
    once instead of in every call, and again only if the weight changes. For a weight other
    readers need in fp32, the LM head tied to the embedding: at distilbart-cnn-12-6 shapes a LoRA
    bf16 step went 1.239-1.245 -> 1.198-1.202 s (two processes each way), for 103 MB of copy and
    103 MB of pack, while each step stops keeping autocast's 103 MB cast for backward."""
    with torch.inference_mode(False), torch.no_grad():
        copy = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    pack_for_linear([_Entry(weight, copy, _copies).made])


def autocast_copy(x: Tensor, weight: Tensor) -> Tensor | None:
    """The held copy of `weight` when `linear` may multiply `x` with it: autocast to the copy's
    dtype is on for x's device, x is what autocast casts, and `weight` needs no gradient. A weight
    changed in place since (DDP's start-up broadcast) gets a new copy, as it would a new pack."""
    entry = _copies.get(id(weight))
    if entry is None or entry.weight() is not weight or (torch.is_grad_enabled() and weight.requires_grad):
        return None
    dtype, device = entry.made.dtype, x.device.type
    if (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != dtype
            or x.dtype not in (torch.float32, dtype)):
        return None
    if not entry.is_current(weight):  # also a weight moved to another device: the copy goes with it
        hold_autocast_copy(weight, dtype)
    copy = _copies[id(weight)].made
    return copy if copy.device == x.device else None


@contextmanager
def packed_casts(weights: Iterable[Tensor]) -> Iterator[None]:
    """Within the block, `linear` multiplies each fp32 one of `weights` under CPU bf16 autocast,
    where no gradient is needed, by a pack of its bf16 cast made here once, instead of casting it
    (and oneDNN reordering the cast) in every call: for a validation pass over many batches, whose
    weights stay as they are. Autocast's own cast, so the same numbers where a pack gives the plain
    weight's (module docstring). As much memory as the bf16 casts, held until the block ends.
    Weights with a held copy (`hold_autocast_copy`) and bf16 ones (already packed) are left alone."""
    made = []
    if BF16_AVAILABLE:
        # Largest first: each pack is reordered from a plain bf16 cast that is freed right after,
        # and the LM head's (103 MB at distilbart-cnn-12-6 shapes) left a hole no later block
        # filled when it came last. First, the smaller casts and packs fit into its hole. Bench
        # eval_bf16_split, memory over the weights: +786-791 -> +653-721 MB (packs: 612 MB).
        for weight in sorted(weights, key=Tensor.numel, reverse=True):
            if (weight.dtype == torch.float32 and can_pack(weight) and id(weight) not in _copies
                    and id(weight) not in _cast_packs):
                _Entry(weight, _reorder(weight, torch.bfloat16), _cast_packs)
                made.append(weight)
    try:
        yield
    finally:
        for weight in made:
            _cast_packs.pop(id(weight), None)


def cast_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """The pack `packed_casts` made of `weight`'s bf16 cast, when `linear` may multiply `x` by it:
    CPU bf16 autocast is on, x is what autocast casts (fp32 or bf16, contiguous), no gradient is
    needed, and the weight has not changed since (else None: the call casts it as usual)."""
    entry = _cast_packs.get(id(weight))
    if entry is None or not entry.is_current(weight) or onednn_linear.needs_grad(x, weight, bias):
        return None
    if (x.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16
            or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous()):
        return None
    return entry.made


def packed_bytes() -> int:
    """Memory held by all packs now."""
    return sum(e.made.numel() * e.made.element_size() for e in _packs.values())
