"""What the benchmarks share: one worker's measurement, and the table of several workers."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def machine() -> str:
    """The CPU model and the vector kernels torch picked: figures hold on the machine measured.

    On Linux the model comes from /proc/cpuinfo; elsewhere from ``platform.processor()``.
    """
    import platform

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        import torch

        model += f", torch kernels {torch.backends.cpu.get_cpu_capability()}"
    except ImportError:
        pass
    return model


def rss_mib() -> float:
    """The process's peak resident set in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measurement_options(parser, repeats: int = 3, rounds: int = 2) -> None:
    """The options every benchmark takes: dtype, device, repeats, rounds (and the worker's mode)."""
    import argparse

    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--mode", help=argparse.SUPPRESS)


def measure(step, device, repeats: int) -> dict:
    """Best time of ``repeats`` calls of ``step`` after a warm-up, and memory base and peak.

    Memory: CUDA allocated on a GPU, else the peak resident set; ``base`` is taken when the
    inputs exist, so ``peak - base`` is what the steps added.
    """
    import torch

    cuda = getattr(device, "type", device) == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib()
    return {"base": base, "peak": peak, "time": min(times[1:])}


def table(results: dict, device: str, width: int = 12) -> dict:
    """Print one row per path (worst peak and growth, best time over rounds); return them."""
    unit = "MiB (CUDA allocated)" if device != "cpu" else "MiB (max RSS)"
    print(f"machine: {machine()}")
    print(f"{'path':{width}} {'peak ' + unit:>26} {'growth':>10} {'time s':>9}")
    summary = {}
    for mode, runs in results.items():
        peak = max(r["peak"] for r in runs)
        growth = max(r["peak"] - r["base"] for r in runs)
        best = min(r["time"] for r in runs)
        summary[mode] = (peak, growth, best)
        print(f"{mode:{width}} {peak:26.0f} {growth:10.0f} {best:9.3f}")
    return summary


def rounds(script: str, argv: list[str], modes, count: int) -> dict:
    """Each mode's worker (``script ARGV --mode=MODE``) in its own process, modes alternating
    over ``count`` rounds so that a noisy neighbour slows all alike; their measurements."""
    results = {mode: [] for mode in modes}
    for _ in range(count):
        for mode in modes:
            out = subprocess.run(
                [sys.executable, script, *argv, f"--mode={mode}"], capture_output=True, text=True
            )
            if out.returncode:
                sys.exit(f"{mode} worker failed:\n{out.stderr[-3000:]}")
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results
