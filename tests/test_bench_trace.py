"""The benchmark's diagnostics (pcbvlm.bench_trace) read PyTorch's records right: a profiler trace's idle
GPU gaps land on the code that was running when the GPU got work again, and the allocator history's peak
on the blocks alive then."""

from __future__ import annotations

from pcbvlm.bench_trace import idle_gaps, peak_tensors


def _kernel(ts, dur, correlation):
    return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _launch(ts, correlation, tid=1):
    return {
        "ph": "X",
        "cat": "cuda_runtime",
        "ts": ts,
        "dur": 2,
        "tid": tid,
        "args": {"correlation": correlation},
    }


def _python(ts, dur, name, tid=1):
    return {"ph": "X", "cat": "python_function", "ts": ts, "dur": dur, "tid": tid, "name": name}


def test_idle_gaps_name_the_code_that_ended_them():
    trace = {
        "traceEvents": [
            _python(0, 1000, "torch/nn/modules/module.py(1): _call_impl"),
            _python(10, 400, "transformers/models/qwen3_vl/modeling_qwen3_vl.py(262): forward"),
            _python(500, 400, "pcbvlm/fused_ops.py(67): _fused_lora_forward"),
            _launch(20, 1),
            _kernel(30, 100, 1),  # busy 30-130
            _launch(300, 2),
            _kernel(310, 50, 2),  # 180 us idle before it, launched in the vision attention
            _launch(600, 3),
            _kernel(600, 100, 3),  # 240 us idle, launched in the LoRA forward
            _kernel(650, 10, 99),  # overlaps the one before: no gap
            _kernel(720, 10, 4),  # 20 us: under the threshold
        ]
    }
    result = idle_gaps(trace, min_gap_us=50)
    assert result["gpu_busy_s"] == round((100 + 50 + 100 + 10) / 1e6, 4)
    assert result["idle_s"] == round((180 + 240 + 20) / 1e6, 4)
    assert result["idle_in_gaps_over_50us_s"] == round(420 / 1e6, 4)
    codes = [(g["code"], g["count"]) for g in result["gaps"]]
    assert codes == [
        ("pcbvlm/fused_ops.py(67): _fused_lora_forward", 1),
        ("transformers/models/qwen3_vl/modeling_qwen3_vl.py(262): forward", 1),
    ]


def _frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


def test_peak_tensors_are_the_blocks_alive_at_the_peak():
    lora = [_frame("/x/site-packages/peft/tuners/lora/layer.py", 7, "forward")]
    offload = [_frame("/repo/lib/pcbvlm/offload.py", 113, "_fetch")]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": lora},
        {"action": "alloc", "addr": 2, "size": 300, "frames": offload},
        {"action": "alloc", "addr": 3, "size": 50, "frames": lora},  # peak: 450
        {"action": "free_requested", "addr": 2, "size": 300},  # still counted until completed
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 4, "size": 200, "frames": lora},  # 350: below the peak
    ]
    result = peak_tensors({"device_traces": [events]})
    assert result["peak_over_start_gib"] == round(450 / 2**30, 3)
    assert result["peak_at_event"] == "2 of 6"
    alive = {row["code"]: row["blocks"] for row in result["alive_at_peak"]}
    assert alive == {"peft/tuners/lora/layer.py:7 forward": 2, "/repo/lib/pcbvlm/offload.py:113 _fetch": 1}
