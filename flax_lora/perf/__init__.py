"""Measuring the step: LoRA training FLOPs, MFU and peak memory (flops), and the library behind
``benchmarks/``.

- ``flops``: LoRA-aware training FLOPs per token, device peaks, MFU, peak device memory.
- ``shapes``: the benchmark model shapes (``PRESETS``), their transformers config, parameter
  count and LoRA targets, and fast random frozen params in the exact tree the model's init gives.
- ``throughput``: build a benchmark model and time the real train step (``benchmarks/bench.py``).
- ``compiled``: the train step compiled on abstract arguments, for the default backend or a
  compile-only GPU; XLA's memory analysis (``benchmarks/memory_check.py``).
- ``estimates``: the advisor's memory estimate for the same shape and setup.
- ``hlo``: optimized-HLO text parsed, and the HBM bytes each executed op moves
  (``benchmarks/hlo_bytes.py``).
- ``trace``: a ``jax.profiler`` trace summed by kernel and kind (``benchmarks/trace_summary.py``).
- ``torch_baseline``: the PyTorch + PEFT baseline, run in a subprocess; torch and peft are
  optional and imported only there.

Only ``flops`` is used by training itself; the other modules import jax, the models and the
training step when imported (``torch_baseline`` excepted), so import them where needed.
Figures measured with them are in ``benchmarks/RESULTS.md``.
"""
