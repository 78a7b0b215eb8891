"""Where a training step's time and memory go, beyond totals: the GPU's idle gaps attributed to the Python
code that was running when the GPU got work again, and the tensors alive at the step's memory peak,
attributed to the code that allocated them. Diagnostics for the benchmark's GPU rows
(`Setting.trace`); both read what PyTorch records (a profiler trace, the allocator's history)."""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

# Frames of these packages name the code; torch's own frames (autograd, nn.Module calls) do not.
_OWN_CODE = ("pcbvlm", "transformers", "peft", "liger_kernel", "bitsandbytes", "checkpoint.py")


def _code_frames(names: list[str], keep: int = 3) -> str:
    frames = [n for n in names if any(part in n for part in _OWN_CODE)]
    return " < ".join(frames[:keep]) or (names[0] if names else "?")


def idle_gaps(trace: dict[str, Any], min_gap_us: float = 50.0, top: int = 12) -> dict[str, Any]:
    """GPU idle time of a profiler trace (chrome format, recorded with `with_stack=True`): the time between
    the end of all GPU work so far and the next kernel or copy, and for gaps of at least `min_gap_us` the
    innermost Python frames of this project's and its libraries' code around the launch that ended the gap
    (where the host was when the GPU got work again)."""
    events = trace.get("traceEvents", [])
    device = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("correlation"))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    launches = {
        e["args"]["correlation"]: (e["ts"], e.get("tid"))
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in ("cuda_runtime", "cuda_driver")
        and "correlation" in e.get("args", {})
    }
    python: dict[Any, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "python_function":
            python.setdefault(e.get("tid"), []).append(
                (e["ts"], e["ts"] + e.get("dur", 0), e.get("name", ""))
            )
    starts = {}
    for tid, spans in python.items():
        spans.sort()
        starts[tid] = [s[0] for s in spans]
    if not device:
        return {"gpu_busy_s": 0.0, "idle_s": 0.0, "gaps": []}
    busy_until, busy, idle, big_idle = device[0][1], device[0][1] - device[0][0], 0.0, 0.0
    by_code: dict[str, list[float]] = {}
    for begin, end, correlation in device[1:]:
        gap = begin - busy_until
        if gap > 0:
            idle += gap
            if gap >= min_gap_us:
                big_idle += gap
                key = "?"
                launch = launches.get(correlation)
                if launch and launch[1] in python:
                    at, tid = launch
                    spans = python[tid]
                    # enclosing spans: started before the launch, still running at it (innermost last)
                    first = bisect.bisect_right(starts[tid], at)
                    enclosing = [s for s in spans[max(0, first - 4000) : first] if s[1] >= at]
                    names = [s[2] for s in sorted(enclosing, key=lambda s: -s[0])]
                    key = _code_frames(names)
                entry = by_code.setdefault(key, [0.0, 0])
                entry[0] += gap
                entry[1] += 1
        busy += max(0.0, end - max(begin, busy_until))
        busy_until = max(busy_until, end)
    span = busy_until - device[0][0]
    ranked = sorted(by_code.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "span_s": round(span / 1e6, 4),
        "gpu_busy_s": round(busy / 1e6, 4),
        "idle_s": round(idle / 1e6, 4),
        f"idle_in_gaps_over_{min_gap_us:g}us_s": round(big_idle / 1e6, 4),
        "gaps": [{"code": k, "idle_s": round(v[0] / 1e6, 4), "count": v[1]} for k, v in ranked],
    }


def trace_idle_gaps(step: Callable[[], float]) -> dict[str, Any]:
    """One step under torch.profiler with Python stacks; its idle gaps (`idle_gaps`)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    begin = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - begin
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return {"wall_s_profiled": round(wall, 3), **idle_gaps(trace)}


def _frames_key(frames: list[dict[str, Any]]) -> str:
    names = [
        f"{f.get('filename', '?').split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
        for f in frames
    ]
    return _code_frames(names)


def peak_tensors(snapshot: dict[str, Any], device: int = 0, top: int = 15) -> dict[str, Any]:
    """From the allocator's history (`torch.cuda.memory._snapshot()` after `_record_memory_history`): the
    blocks alive when the memory allocated during the recording peaked, summed by the code that allocated
    them (innermost frames of this project and its libraries)."""
    traces = snapshot.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    peak_at = 0
    for n, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], _frames_key(e.get("frames", [])))
            current += e["size"]
            if current > peak:
                peak, peak_live, peak_at = current, dict(live), n
        elif action == "free_completed" and e["addr"] in live:
            current -= live.pop(e["addr"])[0]
    by_code: dict[str, list[int]] = {}
    for size, key in peak_live.values():
        entry = by_code.setdefault(key, [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(by_code.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "peak_over_start_gib": round(peak / 2**30, 3),
        "peak_at_event": f"{peak_at} of {len(events)}",
        "code_at_peak": _frames_key(events[peak_at].get("frames", [])) if events else "?",
        "alive_at_peak": [{"code": k, "gib": round(v[0] / 2**30, 3), "blocks": v[1]} for k, v in ranked],
    }


def trace_memory_peak(step: Callable[[], float]) -> dict[str, Any]:
    """One step with the allocator's history recorded: the memory allocated before it, the step's peak,
    and what was alive at the peak (`peak_tensors`)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {
        "allocated_before_gib": round(before / 2**30, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        **peak_tensors(snapshot, torch.cuda.current_device()),
    }
