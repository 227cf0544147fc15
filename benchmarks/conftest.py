"""Shared benchmark set-up: 2 threads, the machine's measured peaks, and the summary table.

Every benchmark sets ``benchmark.group`` (one comparison) and ``benchmark.extra_info`` with
``op``, ``impl`` ("pysonic" for our kernel, a short name for each baseline), ``dtype``, ``flops``
and ``bytes`` (work per call). At the end of the run a Markdown table prints, per group, each
impl's median time, its speed relative to pysonic, and the achieved GFLOP/s or GB/s against the
peaks measured in the same run (a 2048^3 matmul and a 4M-element fp32 copy).
"""
from __future__ import annotations

import time

import pytest
import torch

THREADS = 2
PEAKS: dict[str, float] = {}


def _median_seconds(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_peaks() -> dict[str, float]:
    """GFLOP/s of a 2048^3 fp32 and bf16 matmul and GB/s of a 4M-element copy, on this machine now."""
    if not PEAKS:
        torch.set_num_threads(THREADS)
        n = 2048
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            PEAKS[f"matmul_{name}_gflops"] = 2 * n**3 / _median_seconds(lambda: a @ b) / 1e9
        # A copy of 4M fp32 elements (the size the step-op targets name): read + write bytes.
        src = torch.randn(4 * 2**20)
        dst = torch.empty_like(src)
        PEAKS["copy_gbs"] = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), repeats=51) / 1e9
    return PEAKS


@pytest.fixture(scope="session", autouse=True)
def machine_peaks():
    torch.set_num_threads(THREADS)
    return measure_peaks()


def _rate(info, seconds):
    peaks = PEAKS
    if info.get("flops"):
        peak = peaks.get("matmul_bf16_gflops" if info.get("dtype") in ("bf16", "bfloat16") else "matmul_fp32_gflops")
        rate = info["flops"] / seconds / 1e9
        return f"{rate:.1f} GFLOP/s", f"{100 * rate / peak:.0f}% of matmul" if peak else ""
    if info.get("bytes"):
        rate = info["bytes"] / seconds / 1e9
        peak = peaks.get("copy_gbs")
        return f"{rate:.1f} GB/s", f"{100 * rate / peak:.0f}% of copy" if peak else ""
    return "", ""


def summary_table(benchmarks) -> str:
    groups: dict[str, list] = {}
    for bench in benchmarks:
        if bench.stats is None or not bench.extra_info.get("impl"):
            continue
        groups.setdefault(bench.group or bench.name, []).append(bench)
    lines = [
        f"Machine (measured this run, {THREADS} threads): "
        + ", ".join(f"{k} {v:.1f}" for k, v in PEAKS.items()),
        "",
        "| group | impl | median ms | pysonic speed-up | achieved | of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for group in sorted(groups):
        rows = groups[group]
        ours = [b for b in rows if b.extra_info["impl"] == "pysonic"]
        ours_t = ours[0].stats.median if ours else None
        for bench in sorted(rows, key=lambda b: b.extra_info["impl"] != "pysonic"):
            t = bench.stats.median
            speedup = f"{t / ours_t:.2f}x" if ours_t and bench.extra_info["impl"] != "pysonic" else ""
            rate, peak = _rate(bench.extra_info, t)
            lines.append(f"| {group} | {bench.extra_info['impl']} | {1e3 * t:.3f} | {speedup} | {rate} | {peak} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    terminalreporter.write_sep("=", "pysonic benchmark table (speed-up = baseline time / pysonic time)")
    terminalreporter.write_line(summary_table(session.benchmarks))
