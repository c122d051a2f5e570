"""The matmul floor: how long a case's products alone take on this machine, at their own shapes.

    python -m bench.floor [--quick] [--threads 2] [--cases full_bf16,lora_bf16,eval_fp32] [--device cuda]
                          [--against results.json]

The bench's "% of peak" compares a case with one 2048^3 product, a shape oneDNN runs at its best.
A step's products are smaller and thinner (256 decoder rows, 64-wide attention heads, rank-8
LoRA factors), so even a step that did nothing but multiply would sit below that peak. This
times each product of one iteration by itself, operands already in place and in the layout
autograd hands them over (F.linear forward, `grad @ W` and `grad^T @ x` backward, the attention
bmms and their four backward bmms), on each library that runs it (torch's op, and oneDNN's linear
for 2-D products), and sums the best of `reps` runs of each on the faster library. Nothing else
counts: no casts, norms, softmax, dropout, loss, optimizer or memory traffic between products,
and every product runs with its operands hot in cache. So the floor is a lower bound on any
implementation of the step, ours or theirs: theirs' time over the floor bounds the ratio ours
can reach on this machine.

The products cover exactly the FLOPs `bench/flops.py` counts for the case (tests check that).
`--against` reads a `bench.run --json` file and adds each case's times and the best ratio
theirs' time allows. `--device cuda` times the products on the first GPU (torch's ops only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import flops
from bench.shapes import MODES, Shapes, at_train_py_batch, on_gpu
from models import onednn_linear, packed_weights


@dataclass(frozen=True)
class Product:
    """`count` runs of one matmul: `batch` x ([m, k] @ [k, n]), in the layout `layout` names."""
    layout: str  # "linear": F.linear(x[m,k], W[n,k]); "mm": a[m,k] @ b[k,n]; "mm_at": a is [k,m]
    # transposed (a weight gradient, grad^T @ x); "bmm", "bmm_at", "bmm_bt": the same, batched, with
    # a or b a transposed view (attention's q @ k^T, p^T @ dO, ...)
    batch: int
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count

    def kernels(self, dtype: torch.dtype,
                device: torch.device = torch.device("cpu")) -> list[Callable[[], torch.Tensor]]:
        """The product on each library that can run it, operands in place: torch's op (MKL for
        float32 on the CPU), and for 2-D products oneDNN's linear, which reads strided operands as
        they are (what models/onednn_linear.py runs float32 products on)."""
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        b, m, k, n = self.batch, self.m, self.k, self.n
        if self.layout in ("linear", "mm", "mm_at"):
            x = rand(m, k) if self.layout != "mm_at" else rand(k, m).t()
            w = rand(n, k) if self.layout == "linear" else rand(k, n).t()  # oneDNN's weight is [n, k]
            torch_op = {"linear": lambda: F.linear(x, w), "mm": lambda: torch.mm(x, w.t()),
                        "mm_at": lambda: torch.mm(x, w.t())}[self.layout]
            onednn = onednn_linear.AVAILABLE and (dtype == torch.float32 or packed_weights.BF16_AVAILABLE)
            if device.type == "cpu" and onednn:
                return [torch_op, lambda: onednn_linear.product(x, w)]
            return [torch_op]
        if self.layout == "bmm":
            x, w = rand(b, m, k), rand(b, k, n)
        elif self.layout == "bmm_at":
            x, w = rand(b, k, m).transpose(1, 2), rand(b, k, n)
        elif self.layout == "bmm_bt":
            x, w = rand(b, m, k), rand(b, n, k).transpose(1, 2)
        else:
            raise ValueError(f"unknown layout {self.layout!r}")
        return [lambda: torch.bmm(x, w)]


def linear_products(rows: int, d_in: int, d_out: int, count: int, weight_grad: bool) -> list[Product]:
    """Forward, input gradient and (unless frozen) weight gradient of `count` Linears over `rows` rows."""
    out = [Product("linear", 1, rows, d_in, d_out, count), Product("mm", 1, rows, d_out, d_in, count)]
    if weight_grad:
        out.append(Product("mm_at", 1, d_out, rows, d_in, count))
    return out


def attention_products(heads: int, q_len: int, k_len: int, head_dim: int, count: int,
                       backward: bool) -> list[Product]:
    """scores = q @ k^T and out = p @ v over `heads` (batch x heads) matrices; backward: dp = dO @ v^T,
    dv = p^T @ dO, dq = ds @ k, dk = ds^T @ q."""
    out = [Product("bmm_bt", heads, q_len, head_dim, k_len, count),
           Product("bmm", heads, q_len, k_len, head_dim, count)]
    if backward:
        out += [Product("bmm_bt", heads, q_len, head_dim, k_len, count),
                Product("bmm_at", heads, k_len, q_len, head_dim, count),
                Product("bmm", heads, q_len, k_len, head_dim, count),
                Product("bmm_at", heads, k_len, q_len, head_dim, count)]
    return out


def step_products(shapes: Shapes, kind: str) -> list[Product]:
    """Every product of one iteration of a bench case over one batch: `kind` is "full" (every weight
    trained), "lora" (frozen base, LoRA on q_proj and v_proj) or "eval" (forward only)."""
    backward, weight_grad = kind != "eval", kind == "full"
    b, s, t, d, f = shapes.batch_size, shapes.source_len, shapes.target_len, shapes.d_model, shapes.ffn_dim
    enc, dec, heads, r = shapes.encoder_layers, shapes.decoder_layers, shapes.heads, shapes.lora_rank
    src, tgt, hd = b * s, b * t, d // heads
    products: list[Product] = []

    def linears(rows: int, d_in: int, d_out: int, count: int) -> None:
        products.extend(linear_products(rows, d_in, d_out, count, weight_grad) if backward
                        else linear_products(rows, d_in, d_out, count, False)[:1])

    linears(src, d, d, 4 * enc)  # encoder q, k, v, out
    linears(src, d, f, enc)
    linears(src, f, d, enc)
    linears(tgt, d, d, 6 * dec)  # decoder self q, k, v, out; cross q, out
    linears(src, d, d, 2 * dec)  # cross-attention k, v over the source
    linears(tgt, d, f, dec)
    linears(tgt, f, d, dec)
    linears(tgt, d, shapes.vocab_size, 1)  # LM head
    products += attention_products(b * heads, s, s, hd, enc, backward)
    products += attention_products(b * heads, t, t, hd, dec, backward)
    products += attention_products(b * heads, t, s, hd, dec, backward)
    if kind == "lora":  # x @ A^T then (x A^T) @ B^T, both factors trained: q and v of every attention
        for rows, count in ((src, 2 * enc), (tgt, 2 * dec), (tgt, dec), (src, dec)):  # enc; dec self; cross q; cross v
            products += linear_products(rows, d, r, count, True) + linear_products(rows, r, d, count, True)
    return products


def analytic_flops(shapes: Shapes, kind: str) -> float:
    """What bench/flops.py counts for the same iteration (the batch, not one sample)."""
    m = flops.Dims(shapes.d_model, shapes.encoder_layers, shapes.decoder_layers, shapes.ffn_dim, shapes.ffn_dim,
                   shapes.vocab_size)
    s, t = shapes.source_len, shapes.target_len
    per_sample = {"full": lambda: flops.train_full(m, s, t), "eval": lambda: flops.evaluate(m, s, t),
                  "lora": lambda: flops.train_lora(m, s, t, shapes.lora_rank)}[kind]()
    return per_sample * shapes.batch_size


def floor_seconds(products: list[Product], dtype: torch.dtype, reps: int = 5,
                  device: torch.device = torch.device("cpu")) -> float:
    """Sum over the products of count x the best of `reps` timed runs on the faster library; equal
    products timed once."""
    per_product: dict[tuple, float] = {}
    total = 0.0
    for p in products:
        key = (p.layout, p.batch, p.m, p.k, p.n)
        if key not in per_product:
            per_product[key] = min(flops.best_seconds(kernel, reps, device) for kernel in p.kernels(dtype, device))
        total += per_product[key] * p.count
    return total


CASES = {"full_bf16": ("full", torch.bfloat16), "full_fp32": ("full", torch.float32),
         "lora_bf16": ("lora", torch.bfloat16), "lora_bf16_long": ("lora", torch.bfloat16),
         "eval_bf16": ("eval", torch.bfloat16), "eval_fp32": ("eval", torch.float32)}
# cases whose batch is not the mode's own
CASE_SHAPES = {"lora_bf16_long": at_train_py_batch}


def measured_seconds(results_path: Path) -> dict[str, dict[str, float]]:
    """{case: {"ours": median s, "theirs": median s}} from a `bench.run --json` file."""
    try:
        text = results_path.read_text()
    except OSError as exc:
        raise SystemExit(f"bench.floor: cannot read {results_path}: {exc.strerror or exc}")
    try:
        return {r["case"]: {side: r["sides"][side]["median_s"] for side in ("ours", "theirs")}
                for r in json.loads(text)["results"] if "sides" in r}
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"bench.floor: {results_path}: not a bench.run --json file ({type(exc).__name__}: {exc})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time the matmuls of one bench iteration alone, at their shapes.")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (bench --quick)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2, as bench.run)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per product; the best counts (default: 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the products run (default: cpu)")
    parser.add_argument("--against", type=Path, metavar="RESULTS_JSON",
                        help="a `bench.run --json` file: add its times and the best ratio theirs' time allows")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device here")
    measured = measured_seconds(args.against) if args.against else {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = MODES["quick" if args.quick else "full"]
    peak_n = (on_gpu(shapes) if device.type == "cuda" else shapes).peak_matmul_n
    peak = {dtype: flops.matmul_peak(peak_n, dtype, device=device) for dtype in (torch.float32, torch.bfloat16)}
    header = ["case", "GFLOP", "matmul floor (s)", "floor's GFLOP/s", f"% of the {peak_n}^3 peak"]
    if measured:
        header += ["ours / theirs (s)", "best possible ratio"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        kind, dtype = CASES[name]
        products = step_products(CASE_SHAPES.get(name, lambda same: same)(shapes), kind)
        work = sum(p.flops for p in products)
        seconds = floor_seconds(products, dtype, args.reps, device)
        row = [name, f"{work / 1e9:.1f}", f"{seconds:.4g}", f"{work / seconds / 1e9:.0f}",
               f"{100 * work / seconds / peak[dtype]:.1f}%"]
        if measured:
            times = measured.get(name)
            row += ([f"{times['ours']:.3f} / {times['theirs']:.3f}", f"{times['theirs'] / seconds:.2f}x"] if times
                    else ["not in the file", ""])
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\npeak: fp32 {peak[torch.float32] / 1e9:.0f}, bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s; "
          f"{args.device}, {args.threads} threads")


if __name__ == "__main__":
    main()
