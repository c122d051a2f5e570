"""Machine description, the results table and the targets, as Markdown."""

from __future__ import annotations

import os
import platform
from importlib import metadata

# (case, what, threshold, how to read it from a result)
TARGETS = [
    ("lora_bf16", "LoRA training step ours/theirs >= 1.3x", 1.3, "ratio"),
    ("full_bf16", "full fine-tune bf16 ours/theirs >= 1.3x", 1.3, "ratio"),
    ("eval_bf16", "evaluation loss ours/theirs >= 1.3x", 1.3, "ratio"),
    ("eval_bf16_split", "evaluation loss over a split, as train.py validates, ours/theirs >= 1.3x", 1.3, "ratio"),
    ("eval_bf16_weights", "evaluation loss as evaluate.py --dtype bf16 runs it, ours/theirs >= 1.3x", 1.3, "ratio"),
    ("eval_fp32", "evaluation loss as evaluate.py runs it by default (fp32), ours/theirs >= 1.3x", 1.3, "ratio"),
    ("real_epoch", "real-length epoch ours/theirs >= 1.5x", 1.5, "ratio"),
    ("beam4", "beam-4 generation ours/theirs >= 2x", 2.0, "ratio"),
    ("lora_bf16", "LoRA bf16 step at >= 70% of the measured bf16 matmul peak", 0.70, "ours_frac"),
]
MEMORY_TARGET = 0.9
RUN_PEAK = " (a run's peak)"


MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo, with family/model numbers and the matmul-relevant ISA flags
    (VMs often report a bare 'AMD EPYC')."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    flags = [f for f in MATMUL_FLAGS if f in fields.get("flags", "").split()]
    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}; {' '.join(flags) or 'no AVX2'})")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_model() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
            f"CUDA {torch.version.cuda}")


def machine(threads: int, device: str = "cpu") -> dict:
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "peft": version("peft"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "device": device}
    if device == "cuda":
        info["gpu"] = gpu_model()
    return info


def derive(result: dict) -> dict:
    """Ratios and peak fractions for one case result (in place, returned)."""
    if "sides" not in result:
        return result
    ours, theirs = result["sides"]["ours"], result["sides"]["theirs"]
    peak = result["matmul_peak_flops"][result["dtype"]]
    result["ratio"] = ours["samples_per_s"] / theirs["samples_per_s"]
    result["ours_frac"] = ours["flops_per_s"] / peak
    result["theirs_frac"] = theirs["flops_per_s"] / peak
    if ours["peak_mb"] is not None and theirs["peak_mb"]:
        result["mem_ratio"] = ours["peak_mb"] / theirs["peak_mb"]
    if ours.get("run_peak_mb") is not None and theirs.get("run_peak_mb"):
        result["run_mem_ratio"] = ours["run_peak_mb"] / theirs["run_peak_mb"]
    return result


def median_process(runs: list[dict]) -> dict:
    """One case run in several processes: the run with the median ratio (the lower middle one for
    an even count), carrying every run's ratio in order, and every run's memory ratio as the target
    reads it (a run's peak for training). A failed or skipped run is returned as is."""
    for run in runs:
        if "ratio" not in run:
            return run
    if len(runs) == 1:
        return runs[0]
    chosen = dict(sorted(runs, key=lambda run: run["ratio"])[(len(runs) - 1) // 2])
    chosen["process_ratios"] = [run["ratio"] for run in runs]
    chosen["process_mem_ratios"] = [target_mem_ratio(run) for run in runs]
    return chosen


def target_mem_ratio(result: dict) -> float | None:
    """The memory ratio the target judges: a training case's run peak, else its one iteration."""
    return result.get("run_mem_ratio", result.get("mem_ratio"))


def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    head = ("| case | ours samples/s | theirs samples/s | ratio | ours tokens/s | theirs tokens/s | "
            "ours peak MB | theirs peak MB | mem ratio | ours % of peak | theirs % of peak |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "sides" not in r:
            rows.append(f"| {r['case']} | {r.get('skipped') or 'failed: ' + r.get('error', '?')} |" + " |" * 9)
            continue
        o, t = r["sides"]["ours"], r["sides"]["theirs"]
        rows.append(
            f"| {r['case']} | {_f(o['samples_per_s'], 3)} | {_f(t['samples_per_s'], 3)} | **{_f(r['ratio'])}x** | "
            f"{_f(o['tokens_per_s'], 0)} | {_f(t['tokens_per_s'], 0)} | {_f(o['peak_mb'], 0)} | "
            f"{_f(t['peak_mb'], 0)} | {_f(r.get('mem_ratio'))} | {_f(100 * r['ours_frac'], 1)}% | "
            f"{_f(100 * r['theirs_frac'], 1)}% |")
    return "\n".join(rows)


def case_notes(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "sides" not in r:
            continue
        peak = r["matmul_peak_flops"]
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in r.get("checks", {}).items())
        o, t = r["sides"]["ours"], r["sides"]["theirs"]
        lines.append(
            f"- `{r['case']}`: {r['title']}. Median of {len(o['seconds'])} (s): ours "
            f"{_seconds(o['seconds'])}; theirs {_seconds(t['seconds'])}" + warmups(o, t) + ". "
            f"{o['flops'] / 1e9:.1f} GFLOP per iteration; peak fp32 {peak['fp32'] / 1e9:.0f}, "
            f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; RSS after setup {r['rss_after_setup_mb']:.0f} MB; "
            + (f"GPU memory after setup {r['gpu_allocated_after_setup_mb']:.0f} MB, the process's GPU peak "
               f"(reserved) {r['gpu_process_peak_mb']:.0f} MB; " if "gpu_allocated_after_setup_mb" in r else "") +
            f"other processes used {r.get('other_processes_cores', float('nan')):.2f} cores meanwhile"
            + steady_memory(o, t)
            + (f"; {extra}" if extra else "") + "."
            + (f" Ratio in each of {len(r['process_ratios'])} processes: "
               f"{', '.join(f'{x:.2f}x' for x in r['process_ratios'])} (this row: the median one)."
               if "process_ratios" in r else "")
            + (f" Memory ratio{RUN_PEAK if 'run_mem_ratio' in r else ''} in each: "
               f"{', '.join(_f(x) + 'x' for x in r['process_mem_ratios'])}."
               if r.get("process_mem_ratios") and None not in r["process_mem_ratios"] else ""))
    return "\n".join(lines)


def warmups(ours: dict, theirs: dict) -> str:
    """The untimed warm-up iterations' times (results from before session 12 have none)."""
    if not ours.get("warmup_s"):
        return ""
    return f" (untimed warm-up before them: ours {_seconds(ours['warmup_s'])}; theirs {_seconds(theirs['warmup_s'])})"


def _seconds(times: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in times)


def steady_memory(ours: dict, theirs: dict) -> str:
    """The note on a training case's later steps (optimizer state kept; bench.cases.measure)."""
    o, t = ours.get("steady_peak_mb"), theirs.get("steady_peak_mb")
    if o is None or not t:
        return ""
    note = f"; a later step (optimizer state kept) adds ours {o:.0f}, theirs {t:.0f} MB ({o / t:.2f})"
    ro, rt = ours.get("run_peak_mb"), theirs.get("run_peak_mb")
    if ro is None or not rt:
        return note
    return (note + f"; a run's peak (the larger of the first step and a later step plus the optimizer state: "
            f"ours {ours['state_mb']:.0f}, theirs {theirs['state_mb']:.0f} MB) ours {ro:.0f}, theirs {rt:.0f} MB "
            f"({ro / rt:.2f})")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def targets(results: list[dict]) -> str:
    by_case = {r["case"]: r for r in results if "sides" in r}
    lines = []
    for case, what, threshold, key in TARGETS:
        r = by_case.get(case)
        if r is None:
            lines.append(f"- {what}: not measured")
            continue
        value = r[key]
        shown = f"{100 * value:.1f}%" if key == "ours_frac" else f"{value:.2f}x"
        lines.append(f"- {what}: {shown} — **{'met' if value >= threshold else 'NOT met'}**")
    # a training case is judged on a run's peak (its optimizer state outlives every step), the others on one iteration
    mem = {c: (target_mem_ratio(r), "run_mem_ratio" in r) for c, r in by_case.items()
           if r.get("mem_ratio") is not None}
    if mem:
        met = all(v <= MEMORY_TARGET for v, _ in mem.values())
        per_case = [f"{c} {v:.2f}x{RUN_PEAK if run else ''} ({'met' if v <= MEMORY_TARGET else 'not met'})"
                    for c, (v, run) in mem.items()]
        lines.append(f"- peak memory ours/theirs <= {MEMORY_TARGET}x in every case: **{'met' if met else 'NOT met'}**; "
                     "per case: " + ", ".join(per_case))
    return "\n".join(lines)


def markdown(results: list[dict], info: dict, command: str, mode: str = "full") -> str:
    judged = ("Targets (quick mode: tiny shapes, so these verdicts mean nothing; the targets are "
              "judged on the full mode):" if mode == "quick" else "Targets:")
    return "\n\n".join([
        f"Command: `{command}`",
        (f"Device: GPU {info['gpu']} (both sides; memory columns are GPU memory allocated).\n\n"
         if info.get("gpu") else "")
        + f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['threads']} torch threads; "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}; allocator: {info.get('allocator', 'glibc defaults')}; load average at start {info['load_average_start']}, "
        f"at end {info.get('load_average_end')}; total {info.get('wall_s', 0):.0f} s.",
        table(results), judged + "\n\n" + targets(results), "Per case:\n\n" + case_notes(results),
    ])
