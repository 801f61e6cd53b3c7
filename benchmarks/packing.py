"""Target tokens per second with and without sample packing (``lora train --packing``).

    python benchmarks/packing.py --preset tiny --examples 512 --median 100 --max-length 512

One epoch over the same instruction-like examples (log-normal lengths around ``--median``
tokens, the last ~60% of each trained) through the real train step, unpacked (one example per
row, padded to the batch's length bucket) and packed (several per row up to ``--max-length``),
on the project's Llama port of a ``flax_lora.perf.shapes.PRESETS`` shape. The measuring code is
``flax_lora.perf.packing``; this script is its command line. ``--json OUT`` writes the result.
"""

from __future__ import annotations

import argparse
import json
import sys

from flax_lora.perf.packing import compare
from flax_lora.perf.shapes import PRESETS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--median", type=float, default=100.0, help="median example length (tokens)")
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal spread of the lengths")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    res = compare(PRESETS[args.preset], examples=args.examples, median=args.median, sigma=args.sigma,
                  max_length=args.max_length, batch=args.batch, accum=args.accum, precision=args.precision,
                  r=args.r, targets=tuple(args.targets.split(",")))
    res["preset"] = args.preset
    for kind in ("unpacked", "packed"):
        r = res[kind]
        print(f"{kind:>8}: {r['steps']} steps, buckets {r['shapes']}, {r['real_token_share']:.0%} real tokens, "
              f"{r['target_tokens']} target tokens in {r['seconds']:.2f} s = {r['target_tokens_per_second']:.0f} /s")
    print(f"packed / unpacked: {res['speedup']:.2f}x  ({res['machine'].get('cpu')}, "
          f"avx512_bf16={res['machine'].get('avx512_bf16')}, jax {res['jax']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
