"""Memory traffic of the compiled train step, op by op, from XLA's optimized HLO (no GPU needed).

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/hlo_bytes.py --gpu h200 [--case llama-1b:4:2048:bf16]
    python benchmarks/hlo_bytes.py --hlo step.hlo [--trips 32]      # analyse a saved ``as_text()``

With ``--gpu`` it compiles ``flax_lora.training.step.make_train_step`` for a compile-only GPU (XLA's
deviceless compile, as ``memory_check.py --gpu``: jax with the CUDA plugin, a GPU target
config, autotuning off) on abstract arguments, with the attention the port picks on that GPU
(``--attention``, default ``cudnn``: jax's cuDNN version and compute-capability checks are
answered from the target, since there is no GPU nor cuDNN library to ask; XLA then emits the
``__cudnn$fmha*`` custom calls without building the cuDNN graphs). ``--save-hlo`` keeps the text.

Then, for every instruction the step executes (``while`` bodies times their trip count:
``known_trip_count`` when XLA knows it, else ``--trips``, which defaults to the loss loop's
chunk count for the case), it estimates the HBM bytes read and written, labels each op
(matmul, attention, or the notable ops inside it) and attributes it to the innermost
``flax_lora`` source line; the rules are in ``flax_lora.perf.hlo``, the compile in
``flax_lora.perf.compiled``. It is an estimate of traffic, not a timing (ms figures are bytes
at ``--bandwidth``). How the compiled peak compares with a measured one, and what this tool
found, is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flax_lora.perf.compiled import (allow_cudnn_without_gpu, compile_step, gpu_device, loss_chunks, memory_gb,
                                     parse_case)
from flax_lora.perf.hlo import parse_module, report, traffic


def compiled_text(case: dict, gpu: str, attention: str, save: str | None) -> str:
    """The optimized HLO text of ``case``'s step compiled for ``gpu`` (prints XLA's peak)."""
    os.environ["LORA_ATTENTION"] = attention
    device = gpu_device(gpu)
    if attention in ("cudnn", "auto"):
        allow_cudnn_without_gpu()
    compiled = compile_step(case, device)
    text = compiled.as_text()
    mem = memory_gb(compiled.memory_analysis())
    print(f"XLA peak {mem['xla_peak_gb']:.2f} GiB (temporaries {mem['temp_gb']:.2f} GiB)")
    if save:
        Path(save).write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="llama-1b:4:2048:bf16", help="memory_check.py's case syntax")
    p.add_argument("--gpu", default="h200", help="deviceless GPU target (flax_lora.perf.compiled.GPU_TARGETS)")
    p.add_argument("--attention", default="cudnn", help="LORA_ATTENTION for the compile (xla, cudnn, auto)")
    p.add_argument("--hlo", help="analyse this saved optimized HLO text instead of compiling")
    p.add_argument("--save-hlo", help="write the compiled HLO text here")
    p.add_argument("--trips", type=int, help="trip count of loops XLA does not know (default: the loss's chunks)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200: 4.8e12)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense FLOP/s (H200 bf16: 989e12)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)

    case = parse_case(args.case)
    if args.hlo:
        text = Path(args.hlo).read_text()
    else:
        text = compiled_text(case, args.gpu, args.attention, args.save_hlo)
    trips = args.trips or loss_chunks(case)
    rows = traffic(parse_module(text), unknown_trips=trips)
    out = report(rows, top=args.top, bandwidth=args.bandwidth, peak_flops=args.peak_flops,
                 tokens=case["batch"] * case["seq"])
    print(f"{args.case} on {args.gpu if not args.hlo else args.hlo}, unknown loop trips = {trips}")
    print(out.pop("text"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"case": args.case, "trips": trips, **out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
