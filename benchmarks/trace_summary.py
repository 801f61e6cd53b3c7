"""Where a traced step's time goes: a jax.profiler trace summed by kernel and by kind.

    python benchmarks/trace_summary.py TRACE_DIR [--steps N] [--top 25]

Reads the newest ``*.xplane.pb`` under ``TRACE_DIR`` (written by ``jax.profiler.trace``, e.g.
``bench.py --profile DIR``) with ``jax.profiler.ProfileData``. On a GPU it sums the kernels of
the device planes (``/device:GPU:0`` streams); on a CPU, the XLA operations of the runtime's
threads (they appear with ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``). Per-step figures
divide by ``--steps`` (the traced step count). The summing is ``flax_lora.perf.trace``.
"""

from __future__ import annotations

import argparse
import sys

from flax_lora.perf.trace import format_summary, summarize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (figures are per step)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(format_summary(summarize(args.trace_dir, args.steps), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
