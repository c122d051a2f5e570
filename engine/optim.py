"""AdamW with decoupled weight decay, and the decay / no-decay parameter split.

The update is the same arithmetic, in the same order, as `torch.optim.AdamW` with its
defaults (foreach path, amsgrad=False, maximize=False), so the two agree to rounding and
their state dicts are interchangeable: per-parameter `step` (float32 CPU tensor),
`exp_avg`, `exp_avg_sq`.

On the CPU the update runs over cache-sized slices with one reused scratch buffer (no allocation
per step). On a GPU it runs foreach ops over runs of at most GPU_CHUNK_NUMEL elements, so its one
temporary (the denominator) stays small. Big fp32 CPU models can instead use one
`torch.compile`d pass per parameter (`compile=None` does so from COMPILE_MIN_NUMEL trainable
elements): ~3x faster than the eager ops, equal to them within 1e-6, at a one-off compile of
~15 s. If compiling fails, the optimizer
warns once and goes on with the eager ops.

`step(clip_coef=c)` multiplies each gradient by the 0-dim tensor `c` as the update reads it, the
product `clip_grad_norm_` would have written back into the gradient first (engine/grad_clip.py);
the gradients themselves are left as they are.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Parameters under modules with these names are never decayed (BART naming).
EMBEDDING_NAMES = ("embed_tokens", "embed_positions", "shared")
LAYER_NORM_NAMES = ("layer_norm", "layernorm")
CPU_CHUNK_NUMEL = 1 << 16  # elements per CPU slice: its param, grad, moments and scratch stay in L2
GPU_CHUNK_NUMEL = 1 << 25  # elements per GPU run of foreach ops: a denominator of at most 128 MB fp32
COMPILE_MIN_NUMEL = 20_000_000  # fp32 CPU elements per step that repay the one-off compile


@dataclass(frozen=True)
class Hyper:
    """One param group's hyper-parameters, and the per-step factors every update path shares
    (computed by the same float expressions everywhere, so the paths agree bit for bit)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict) -> Hyper:
        return cls(group["lr"], group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"])

    @property
    def decay(self) -> float:
        return 1.0 - self.lr * self.weight_decay  # decoupled: shrink the weights, not the grads

    def step_size(self, step: float) -> float:
        return -self.lr / (1.0 - self.beta1 ** step)

    def bias_correction2_sqrt(self, step: float) -> float:
        return (1.0 - self.beta2 ** step) ** 0.5


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), vectorised with _foreach ops."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        compile: bool | None = None,
    ):
        """`compile`: True / False forces the compiled CPU update on / off; None uses it for
        COMPILE_MIN_NUMEL or more fp32 CPU elements in one group."""
        if lr < 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.compile = compile  # not a group hyper-parameter: state dicts stay torch.optim.AdamW's
        self._compile_failed = False
        self._scratch_buffers: dict[torch.dtype, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             clip_coef: torch.Tensor | None = None, release_grads: bool = False) -> torch.Tensor | None:
        """One update. `clip_coef`: a 0-dim tensor every gradient is multiplied by first, as
        `engine.grad_clip.clip_coefficient` gives it (None: the gradients as they are).
        `release_grads`: set each `.grad` to None (freeing it) once its parameter is updated, as
        `zero_grad(set_to_none=True)` would after the step; where moments are still to be made
        (a first step), parameter by parameter, each one's moments made only then. A first step's
        moments (twice the gradients' bytes) then reuse the memory of the gradients updated before
        them instead of all coming on top of every gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = Hyper.of(group)
            # foreach kernels need one device and dtype per list
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for (device, dtype), params in buckets.items():
                compiled = device.type == "cpu" and self._use_compiled(dtype, params)
                # One parameter at a time only while moments are being made (a first step): later
                # steps gain no memory from it, and a GPU's foreach ops want whole lists.
                one_by_one = release_grads and any(not self.state[p] for p in params)
                for run in ([p] for p in params) if one_by_one else [params]:
                    lists = self._lists(run)
                    if compiled:
                        self._compiled_update(*lists, hyper, clip_coef)
                    elif device.type == "cpu":
                        _adamw_update_cpu(*lists, hyper, self._scratch(dtype), clip_coef)
                    else:
                        _adamw_update(*lists, hyper, clip_coef)
                    if release_grads:
                        for p in run:
                            p.grad = None
                    del lists  # its references too, before the next run's moments are made
        return loss

    def _lists(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        """(params, grads, exp_avgs, exp_avg_sqs, steps), the state made where it is missing."""
        lists = ([], [], [], [], [])
        for p in params:
            state = self.state[p]
            if not state:
                # float32 on CPU, as torch.optim.AdamW keeps it: reading it never syncs a GPU
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                lst.append(t)
        return lists

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """One reused [2, CPU_CHUNK_NUMEL] buffer per dtype for a CPU slice's denominator and its
        clipped gradient: no allocation per step."""
        buffers = self._scratch_buffers
        if dtype not in buffers or buffers[dtype].shape != (2, CPU_CHUNK_NUMEL):
            buffers[dtype] = torch.empty(2, CPU_CHUNK_NUMEL, dtype=dtype)
        return buffers[dtype]

    def _use_compiled(self, dtype: torch.dtype, params: list[torch.Tensor]) -> bool:
        # fp32 only: for bf16 one fused fp32 pass would round differently from torch's per-op rounding
        if self.compile is False or dtype != torch.float32 or self._compile_failed:
            return False
        return self.compile or sum(p.numel() for p in params) >= COMPILE_MIN_NUMEL

    def _compiled_update(self, params, grads, exp_avgs, exp_avg_sqs, steps, hyper: Hyper,
                         clip_coef: torch.Tensor | None) -> None:
        grad_factor = 1.0 if clip_coef is None else float(clip_coef)  # fp32, so the same product
        for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
            if not all(x.is_contiguous() for x in (p, g, m, v)):
                _adamw_update_cpu([p], [g], [m], [v], [step], hyper, self._scratch(p.dtype), clip_coef)
                continue
            t = step.item() + 1.0
            factors = torch.tensor([hyper.decay, 1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2,
                                    hyper.bias_correction2_sqrt(t), hyper.eps, hyper.step_size(t), grad_factor])
            try:
                _compiled_adamw()(p.view(-1), g.view(-1), m.view(-1), v.view(-1), factors)
            except Exception as exc:  # no C++ compiler, unsupported platform, ...: the eager ops still work
                warnings.warn(f"AdamW: torch.compile of the CPU update failed ({type(exc).__name__}: {exc}); "
                              "using the eager update", stacklevel=3)
                self._compile_failed = True
                _adamw_update_cpu(params[i:], grads[i:], exp_avgs[i:], exp_avg_sqs[i:], steps[i:], hyper,
                                  self._scratch(p.dtype), clip_coef)
                return
            step += 1


def _fused_adamw_pass(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: torch.Tensor) -> None:
    """The update of `_adamw_update` in one expression per tensor, for torch.compile to fuse into a
    single loop. `hyper` = [decay, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps, step size,
    the gradient's clipping factor], a tensor so a new learning rate does not recompile."""
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size, grad_factor = hyper.unbind()
    g = g * grad_factor
    m_new = torch.lerp(m, g, one_minus_beta1)
    v_new = v * beta2 + one_minus_beta2 * g * g
    denom = v_new.sqrt() / bias_correction2_sqrt + eps
    p.copy_(p * decay + step_size * (m_new / denom))
    m.copy_(m_new)
    v.copy_(v_new)


_COMPILED: list = []
# With a symbolic size, inductor's C++ backend emits a serial loop unless told that the thread
# count is decided at run time: then the loop gets an OpenMP region, and on 2 threads the pass is
# 1.8x faster (a [50264, 1024] tensor: 24.8 -> 13.7 ms; torch's fused AdamW: 13.9 ms).
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


def _compiled_adamw():
    if not _COMPILED:  # one compiled function per process: dynamic=True covers every parameter size
        _COMPILED.append(torch.compile(_fused_adamw_pass, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS))
    return _COMPILED[0]


def _adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], hyper: Hyper,
                  clip_coef: torch.Tensor | None = None) -> None:
    """GPU: each foreach op is a few kernel launches for a run of tensors (`_runs`)."""
    # a 0-d tensor increment avoids re-wrapping the scalar 1 for every CPU step tensor
    torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    times = [s.item() for s in steps]
    for ps, gs, ms, vs, ts in _runs(params, grads, exp_avgs, exp_avg_sqs, times, GPU_CHUNK_NUMEL):
        if clip_coef is not None:  # a run's worth of clipped gradients at a time, as the denominator
            gs = torch._foreach_mul(gs, clip_coef.to(gs[0].device))
        if hyper.weight_decay != 0.0:
            torch._foreach_mul_(ps, hyper.decay)
        torch._foreach_lerp_(ms, gs, 1.0 - hyper.beta1)
        torch._foreach_mul_(vs, hyper.beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - hyper.beta2)

        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [hyper.bias_correction2_sqrt(t) for t in ts])
        torch._foreach_add_(denom, hyper.eps)
        torch._foreach_addcdiv_(ps, ms, denom, [hyper.step_size(t) for t in ts])
        del denom  # else it is still held while the next run's is allocated: two at the peak


def _runs(params, grads, exp_avgs, exp_avg_sqs, times: list[float], limit: int):
    """(params, grads, exp_avgs, exp_avg_sqs, times) lists of at most `limit` elements in all: a big
    tensor as flat slices, small ones grouped. The update is elementwise, so this changes no bit;
    it bounds the denominator's temporary, which over a whole group was as large as the group.
    Full fine-tune at distilbart-cnn-12-6 shapes on an H100: step peak 4045 -> 3624 MiB (fused
    torch AdamW: 3496); the optimizer step alone took as long either way (11-12 ms)."""
    run, size = [[], [], [], [], []], 0
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, times):
        for piece in _slices((p, g, m, v), limit):
            if size and size + piece[0].numel() > limit:
                yield run
                run, size = [[], [], [], [], []], 0
            for lst, x in zip(run, (*piece, t)):
                lst.append(x)
            size += piece[0].numel()
    if run[0]:
        yield run


def _slices(tensors: tuple[torch.Tensor, ...], limit: int):
    """Matching flat slices of at most `limit` elements of same-shaped `tensors` (a parameter, its
    gradient and moments); the tensors whole if any is not contiguous (rare)."""
    if not all(x.is_contiguous() for x in tensors):
        return [tensors]
    flat = [x.view(-1) for x in tensors]
    return (tuple(x[i:i + limit] for x in flat) for i in range(0, tensors[0].numel(), limit))


def _adamw_update_cpu(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], hyper: Hyper,
                      scratch: torch.Tensor, clip_coef: torch.Tensor | None = None) -> None:
    """CPU: the same ops in the same order as `_adamw_update` (CPU foreach ops are per-tensor
    loops, so the results are bit-identical), but over flat slices of CPU_CHUNK_NUMEL elements,
    so all eight passes over a slice run while it is still in cache, and the denominator (and
    the clipped gradient) go into `scratch` ([2, CPU_CHUNK_NUMEL]) instead of fresh tensors."""
    denom_scratch, grad_scratch = scratch
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step += 1
        t = step.item()
        step_size, bias_correction2_sqrt = hyper.step_size(t), hyper.bias_correction2_sqrt(t)
        for ps, gs, ms, vs in _slices((p, g, m, v), CPU_CHUNK_NUMEL):
            # one-tensor foreach ops, not Tensor.mul_ etc.: for bf16 they round the scalar to bf16
            # first, and matching that keeps us bit-identical to torch.optim.AdamW
            if clip_coef is not None:
                gs = torch.mul(gs, clip_coef, out=grad_scratch[:gs.numel()]) if gs.dim() == 1 else gs * clip_coef
            ps_, gs_, ms_, vs_ = [ps], [gs], [ms], [vs]
            if hyper.weight_decay != 0.0:
                torch._foreach_mul_(ps_, hyper.decay)
            torch._foreach_lerp_(ms_, gs_, 1.0 - hyper.beta1)
            torch._foreach_mul_(vs_, hyper.beta2)
            torch._foreach_addcmul_(vs_, gs_, gs_, 1.0 - hyper.beta2)
            denom = [torch.sqrt(vs, out=denom_scratch[:vs.numel()]) if vs.dim() == 1 else vs.sqrt()]
            torch._foreach_div_(denom, [bias_correction2_sqrt])
            torch._foreach_add_(denom, hyper.eps)
            torch._foreach_addcdiv_(ps_, ms_, denom, [step_size])


def is_decayed(name: str, param: torch.Tensor, owner: nn.Module) -> bool:
    """Weight decay goes on weight matrices only (nanoGPT's dim >= 2 rule, plus BART's names)."""
    if param.dim() < 2:  # biases, LayerNorm weights and other vectors
        return False
    if isinstance(owner, (nn.Embedding, nn.LayerNorm)):
        return False
    parts = name.lower().split(".")
    if any(part in EMBEDDING_NAMES for part in parts):
        return False
    if any(norm in part for part in parts for norm in LAYER_NORM_NAMES):
        return False
    return True


def split_decay_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of trainable parameters that get weight decay, and of those that do not.

    A tied tensor (e.g. BART's `model.shared.weight` = `lm_head.weight`) is listed once, under
    its first name, and is decayed only if every one of its names says so.
    """
    first_name: dict[int, str] = {}
    decayed: dict[int, bool] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            key = id(param)
            first_name.setdefault(key, name)
            decayed[key] = decayed.get(key, True) and is_decayed(name, param, module)
    decay = [n for k, n in first_name.items() if decayed[k]]
    no_decay = [n for k, n in first_name.items() if not decayed[k]]
    return decay, no_decay


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer param groups: weight matrices decayed, everything else not; empty groups dropped."""
    decay_names, no_decay_names = split_decay_names(model)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    groups = [
        {"params": [by_name[n] for n in decay_names], "weight_decay": weight_decay},
        {"params": [by_name[n] for n in no_decay_names], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("param_groups_for_weight_decay: the model has no parameter with requires_grad=True")
    return groups
