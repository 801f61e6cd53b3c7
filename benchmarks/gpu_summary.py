"""Helpers of gpu_run.sh: record one part's result, merge the parts and print the summary table.

    python gpu_summary.py --part NAME RC RAW_JSON OUT_JSON ENV   # one part
    python gpu_summary.py PARTS_DIR RESULTS_JSON                 # merge + table
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def record(name, rc, raw, out, envs):
    try:
        res = json.load(open(raw))
    except Exception as exc:
        res = {"error": f"no result ({type(exc).__name__})"}
    res.update(part=name, rc=int(rc), env=envs)
    if int(rc) in (124, 137):
        res["error"] = (res.get("error", "") + f" timed out (rc {rc}); partial results kept").strip()
    json.dump(res, open(out, "w"), indent=1, default=str)


def fmt(v, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-".rjust(width)


def merge(parts_dir, results):
    parts = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(parts_dir, "*.json")))]
    json.dump(parts, open(results, "w"), indent=1, default=str)
    print(f"\n{'part':<4} {'impl':<11} {'tok/s':>9} {'MFU':>6} {'peak GiB':>8} {'advisor':>8} {'first s':>7} "
          f"{'recomp':>6}  ratio  env")
    for p in parts:
        ours, torch = p.get("ours", {}).get("bf16"), p.get("torch", {}).get("bf16")
        if not ours and not torch:
            print(f"{p['part']:<4} ERROR {str(p.get('error'))[:200]}")
            continue
        for impl, res in (("ours", ours), ("torch+peft", torch)):
            if not res:
                continue
            if "error" in res:
                print(f"{p['part']:<4} {impl:<11} ERROR {str(res['error'])[-200:]}")
                continue
            ratio = p.get("ratio", {}).get("bf16") if impl == "ours" else None
            print(f"{p['part']:<4} {impl:<11} {fmt(res.get('tokens_per_second'), '9.0f')} {fmt(res.get('mfu'), '6.1%')} "
                  f"{fmt(res.get('peak_memory_gb'), '8.2f')} {fmt(res.get('advisor_estimate_gb'), '8.2f')} "
                  f"{fmt(res.get('first_step_seconds'), '7.1f')} {fmt(res.get('recompiles_after_first_step'), '6d')}"
                  f"  {fmt(ratio, '5.2f')}  {p.get('env', '')}")


if __name__ == "__main__":
    if sys.argv[1] == "--part":
        record(*sys.argv[2:7])
    else:
        merge(sys.argv[1], sys.argv[2])
