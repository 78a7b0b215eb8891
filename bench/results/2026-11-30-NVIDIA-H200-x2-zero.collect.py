"""Collect the tiny Trainer runs of gpu.sh into one JSON: exit codes, launch facts, losses per step,
checkpoints, resume source. Usage: collect.py OUT.json LABEL EXIT RUNS_DIR SECONDS"""

import json
import sys
from pathlib import Path

out, label, code, runs_dir, seconds = sys.argv[1:6]
out = Path(out)
doc = json.loads(out.read_text()) if out.exists() else {}
entry = {"exit": int(code), "seconds": int(seconds)}
runs = sorted(p for p in Path(runs_dir).glob("*/") if p.is_dir())
if runs:
    run = runs[0]
    entry["run"] = run.name
    entry["checkpoints"] = sorted(p.name for p in run.glob("checkpoint-*"))
    entry["checkpoint_files"] = {
        p.name: sorted(q.name for q in p.iterdir()) for p in run.glob("checkpoint-*")
    }
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        entry["losses"] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
        entry["eval_losses"] = [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]
        entry["peak_vram_gib"] = max((r.get("peak_vram_gib") or 0) for r in rows) if rows else None
    manifest = run / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        entry["manifest"] = {k: m[k] for k in ("launch", "world_size", "resumed_from", "global_step", "train_loss", "eval_loss", "status", "seconds", "samples_per_s", "peak_vram_gib", "packages", "gpu") if k in m}
        entry["manifest_keys"] = sorted(m)
doc[label] = entry
out.write_text(json.dumps(doc, indent=1))
print(f"{label}: exit {code}, {seconds} s, checkpoints {entry.get('checkpoints')}, losses {entry.get('losses')}")
