"""Analytic matmul FLOPs of BART's work, and the machine's measured matmul peak.

Counts are *model* FLOPs (2 per multiply-add of every matmul the algorithm needs: linear layers,
the two attention matmuls, the LM head at target positions), the same number for both sides, so
"% of peak" compares useful work, not what an implementation happens to execute (padding, logits
at positions nobody reads). Embedding look-ups, norms, softmax and the optimizer are not counted.

Backward costs: full fine-tuning = 3x forward (input and weight gradients). LoRA = frozen linears
need only the input gradient (2x forward), the attention matmuls and the LoRA matmuls 3x.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import onednn_linear
from models.generate import OneDNNLinear


@dataclass(frozen=True)
class Dims:
    d: int
    enc_layers: int
    dec_layers: int
    enc_ffn: int
    dec_ffn: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        """From our BartConfig (or anything with the same field names)."""
        return cls(config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_ffn_dim,
                   config.decoder_ffn_dim, config.vocab_size)


@dataclass(frozen=True)
class Forward:
    linear: float
    attention: float
    head: float
    lora: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head + self.lora


def encoder_linear(m: Dims, s: int) -> float:
    return m.enc_layers * s * 2 * (4 * m.d * m.d + 2 * m.d * m.enc_ffn)


def forward(m: Dims, s: int, t: int, lora_rank: int = 0) -> Forward:
    """One sample, source length s, target length t (teacher forcing)."""
    linear = encoder_linear(m, s) + m.dec_layers * (
        t * 2 * (6 * m.d * m.d + 2 * m.d * m.dec_ffn)  # self q,k,v,out + cross q,out + fc1, fc2
        + s * 2 * 2 * m.d * m.d)  # cross-attention k, v over the source
    attention = m.enc_layers * 4 * s * s * m.d + m.dec_layers * (4 * t * t * m.d + 4 * t * s * m.d)
    head = 2 * t * m.d * m.vocab
    # LoRA on q_proj and v_proj: encoder self (s, s), decoder self (t, t), cross q (t), cross v (s)
    lora = 4 * m.d * lora_rank * (m.enc_layers * 2 * s + m.dec_layers * (3 * t + s)) if lora_rank else 0.0
    return Forward(linear, attention, head, lora)


def train_full(m: Dims, s: int, t: int) -> float:
    return 3 * forward(m, s, t).total


def train_lora(m: Dims, s: int, t: int, rank: int) -> float:
    f = forward(m, s, t, rank)
    return 2 * f.linear + 3 * f.attention + 2 * f.head + 3 * f.lora


def evaluate(m: Dims, s: int, t: int) -> float:
    return forward(m, s, t).total


def generate(m: Dims, s: int, new_tokens: int, beams: int) -> float:
    """One sample: the encoder once, then per beam row the cross-attention keys/values once and
    `new_tokens` single-token decoder steps over a growing self-attention cache."""
    encoder = encoder_linear(m, s) + m.enc_layers * 4 * s * s * m.d
    cross_kv = m.dec_layers * s * 2 * 2 * m.d * m.d
    per_step = m.dec_layers * 2 * (6 * m.d * m.d + 2 * m.d * m.dec_ffn) + 2 * m.d * m.vocab
    keys = new_tokens * (new_tokens + 1) / 2  # cached keys summed over the steps
    attention = m.dec_layers * (4 * keys * m.d + 4 * new_tokens * s * m.d)
    return encoder + beams * (cross_kv + new_tokens * per_step + attention)


def matmul_peak(n: int, dtype: torch.dtype, reps: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype`. On the CPU, on the current threads, by either
    library: `torch.mm` (MKL for float32) or oneDNN's linear, which generation uses and which is
    the faster of the two for float32 on some CPUs (AMD EPYC here). On a GPU, `torch.mm` with
    PyTorch's default settings (float32 without TF32, as both sides' fp32 cases run)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # random: zeros run faster on GPUs
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    kernels = [lambda: torch.mm(a, b)]
    if device.type == "cpu" and OneDNNLinear.available and dtype in OneDNNLinear.dtypes:
        kernels.append(lambda: onednn_linear.product(a, b))
    return 2 * n ** 3 / min(best_seconds(kernel, reps, device) for kernel in kernels)


def best_seconds(run: Callable[[], object], reps: int, device: torch.device = torch.device("cpu")) -> float:
    """The fastest of `reps` timed calls of `run`, after one untimed call (kernel selection, packing
    setup); on a GPU each call is timed to the device's end of it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
