"""Benchmark medsum against Transformers + PEFT, side by side.

    python -m bench.run [--quick] [--cases lora_bf16,beam4,...] [--threads 2] [--device cuda]
                        [--json results.json] [--markdown results.md]
    python -m bench.run --profile lora_bf16 [--profile-side ours|theirs] [--quick]

Each case runs in its own Python process (a fresh memory high-water mark, no allocator state
carried over from another case); inside it ours and theirs hold the same weights, see the same
batches and are timed alternately (ours, theirs, ours, theirs, ...) on the same threads, after
`warmup` untimed iterations each. The table (Markdown) goes to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CASE_NAMES = ("lora_bf16", "lora_bf16_long", "full_bf16", "full_fp32", "eval_bf16", "eval_bf16_split",
              "eval_bf16_weights", "eval_fp32", "beam4", "greedy", "real_epoch")


def _setup_torch(threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    return torch


def run_child(case: str, mode: str, threads: int, result_path: Path, device_name: str = "cpu") -> None:
    """One case, both sides, in this process; the result is written as JSON to `result_path`."""
    torch = _setup_torch(threads)
    from bench import cases, flops, memory
    from bench.shapes import MODES, on_gpu

    device = torch.device(device_name)
    shapes = MODES[mode] if device.type == "cpu" else on_gpu(MODES[mode])
    result = {"case": case, "mode": mode, "threads": threads, "device": device_name}
    def peaks() -> dict:
        return {"fp32": flops.matmul_peak(shapes.peak_matmul_n, torch.float32, device=device),
                "bf16": flops.matmul_peak(shapes.peak_matmul_n, torch.bfloat16, device=device)}

    result["matmul_peak_flops"] = peaks()
    try:
        setup = cases.CASES[case](shapes, device)
    except cases.Skip as skip:
        result["skipped"] = str(skip)
    else:
        result.update(title=setup.title, dtype=setup.dtype, notes=setup.notes,
                      rss_after_setup_mb=memory.rss_mb())
        if device.type == "cuda":
            result["gpu_allocated_after_setup_mb"] = torch.cuda.memory_allocated(device) / 2**20
        result["sides"] = cases.measure(setup, shapes.warmup, device)
        result["checks"] = setup.checks()
        result["process_peak_mb"] = memory.process_peak_mb()
        if device.type == "cuda":
            result["gpu_process_peak_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        # the machine's peak is the best reading, before or after the case (others share the CPU)
        after = peaks()
        result["matmul_peak_flops"] = {k: max(v, after[k]) for k, v in result["matmul_peak_flops"].items()}
    atomic_write_text(result_path, json.dumps(result, indent=1))


def cpu_busy_seconds() -> float:
    """CPU time all processes on the machine have used since boot (every core, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait: float, threads: int, window: float = 3.0) -> float:
    """Wait (up to `max_wait` s) for a `window` in which other processes leave at least `threads`
    cores free; returns the seconds waited."""
    busy_cores = max(0.15, (os.cpu_count() or 1) - threads - 0.1)
    start = time.perf_counter()
    while True:
        before = cpu_busy_seconds()
        time.sleep(window)
        if (cpu_busy_seconds() - before) / window < busy_cores or time.perf_counter() - start > max_wait:
            return time.perf_counter() - start


def run_case(case: str, quick: bool, threads: int, keep_freed: bool = False, device: str = "cpu") -> dict:
    """Run one case in a child process; also note how much CPU *other* processes used meanwhile."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.run", "--child", case, "--result", str(out),
                   "--threads", str(threads), "--device", device] + (["--quick"] if quick else []) + (
                   ["--keep-freed-memory"] if keep_freed else [])
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        busy, ours, start = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        others = max(0.0, (cpu_busy_seconds() - busy) - (children_cpu_seconds() - ours)) / wall
        if done.returncode != 0 or not out.exists():
            return {"case": case, "error": f"child process exited with status {done.returncode}"}
        result = json.loads(out.read_text())
        result["other_processes_cores"] = others
        result["wall_s"] = wall
        return result


def profile(case: str, mode: str, threads: int, side: str, iters: int, rows: int, device_name: str = "cpu") -> str:
    torch = _setup_torch(threads)
    from bench import cases
    from bench.shapes import MODES

    device = torch.device(device_name)
    setup = cases.CASES[case](MODES[mode], device)
    chosen = setup.sides[side]
    # as many warm-ups as the timed run gives the case (full fine-tuning's heap settles over two steps)
    for _ in range(setup.warmups(MODES[mode].warmup)):
        (chosen.warm or chosen.run)()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            chosen.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{setup.title}: {side}, {iters} iteration(s)\n"
            + prof.key_averages().table(sort_by=sort, row_limit=rows))


def parse_cases(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(CASE_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke check (under a minute)")
    parser.add_argument("--cases", type=parse_cases, default=list(CASE_NAMES),
                        help=f"comma-separated subset of {','.join(CASE_NAMES)}")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: 2; 1 with --quick, "
                        "where tiny ops gain nothing from a second thread and its barriers add noise)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides run (default: cpu). cuda: the first GPU, bf16 generation, "
                        "more timed iterations (bench/shapes.py on_gpu), GPU memory in the memory columns")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each case, wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run both sides with glibc keeping freed memory, as train.py and evaluate.py "
                        "set it for themselves (engine/allocator.py); default: glibc's defaults")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run each case in N processes, one after another, and report the one with the "
                        "median ratio, listing all N ratios (the same code differs by up to ~10%% between "
                        "processes; default: 1)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown report here too")
    parser.add_argument("--profile", choices=CASE_NAMES, help="profile one side of one case instead")
    parser.add_argument("--profile-side", choices=("ours", "theirs"), default="ours")
    parser.add_argument("--profile-iters", type=int, default=1)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--child", choices=CASE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: PyTorch sees no CUDA device here")

    if args.keep_freed_memory and (args.child or args.profile):
        # what train.py and evaluate.py do; process-wide, so it applies to both sides alike
        from engine.allocator import keep_freed_memory
        keep_freed_memory()
    if args.child:
        if args.result is None:
            parser.error("--child needs --result")
        run_child(args.child, mode, args.threads, args.result, args.device)
        return 0
    if args.profile:
        print(profile(args.profile, mode, args.threads, args.profile_side, args.profile_iters, args.profile_rows,
                      args.device))
        return 0

    from bench import report

    info = report.machine(args.threads, args.device)
    info["allocator"] = ("glibc, freed memory kept for both sides (--keep-freed-memory)" if args.keep_freed_memory
                         else "glibc defaults for both sides")
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    results = []
    for i, case in enumerate(args.cases, 1):
        case_start, runs, waited = time.perf_counter(), [], 0.0
        for _ in range(args.processes):
            waited += wait_until_idle(args.wait_idle, args.threads) if args.wait_idle > 0 else 0.0
            runs.append(report.derive(run_case(case, args.quick, args.threads, args.keep_freed_memory, args.device)))
        result = report.median_process(runs)
        result["waited_for_idle_s"] = waited
        results.append(result)
        if "sides" in result:
            summary = (f"ours {result['sides']['ours']['samples_per_s']:.3f}, theirs "
                       f"{result['sides']['theirs']['samples_per_s']:.3f} samples/s, ratio {result['ratio']:.2f}x")
        else:
            summary = result.get("skipped") or result.get("error")
        others = result.get("other_processes_cores")
        print(f"[{i}/{len(args.cases)}] {case}: {summary} ({time.perf_counter() - case_start:.0f} s"
              + (f", other processes used {others:.2f} cores" if others is not None else "") + ")",
              file=sys.stderr, flush=True)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["wall_s"] = time.perf_counter() - start
    text = report.markdown(results, info, command.strip(), mode)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": info, "command": command.strip(), "mode": mode,
                                             "results": results}, indent=1))
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
