"""Where a traced step's time goes: a ``jax.profiler`` trace summed by kernel and by kind.

:func:`summarize` reads the newest ``*.xplane.pb`` under a trace directory (written by
``jax.profiler.trace``) with ``jax.profiler.ProfileData``. On a GPU it sums the kernels of the
device planes (``/device:GPU:0`` streams); on a CPU, the XLA operations of the runtime's threads
(they appear with ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``). Each event counts its self
time (:func:`self_times`: a container such as a ``while`` around a scan body keeps only what its
nested events do not cover). Per-step figures divide by the traced step count.
:func:`format_summary` prints it; ``benchmarks/trace_summary.py`` is the command line.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict

# kind -> pattern on the kernel / op name (first match wins; order matters)
KINDS = (
    ("attention", r"cudnn|flash|fmha|attention|sdpa|dot_product"),
    ("collective", r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|collective"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|sm\d+_xmma|dot|matmul|ynn|xnn|onednn|eigen.*contract"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic.update.slice|dynamic.slice|concatenate"),
    ("reduction", r"reduce|softmax|argmax"),
    ("fusion", r"fusion|loop_|input_|triton"),
)
_HOST_NOISE = re.compile(r"^(\$|ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|end: |PjitFunction|Common|"
                         r"Handle |Wait for|Allocate|ParseArguments|PythonRef|TfrtCpu|PjRt)")


def kind_of(name: str) -> str:
    """The ``KINDS`` entry a kernel or op name matches first, else ``other``."""
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def self_times(events):
    """(name, self time) of each ``(start, end, name)`` event of one line: a container (a ``while`` around a scan body)
    keeps only the time none of its nested events covers, so nothing is counted twice."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    out, stack = [], []  # stack: [end, name, self]
    for start, end, name in events:
        while stack and stack[-1][0] <= start:
            out.append((stack[-1][1], stack.pop()[2]))
        if stack:
            stack[-1][2] -= min(end, stack[-1][0]) - start
        stack.append([end, name, end - start])
    out.extend((name, self_ns) for _, name, self_ns in reversed(stack))
    return out


def newest_xplane(trace_dir: str) -> str:
    """Path of the newest ``*.xplane.pb`` under ``trace_dir`` (searched recursively)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return max(files, key=os.path.getmtime)


def summarize(trace_dir: str, steps: int = 1) -> dict:
    """{"device": plane, "total_ms": per step, "kernels": [(name, kind, ms, count)], "kinds": {kind: ms}}."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(newest_xplane(trace_dir))
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    on_device = bool(planes)
    if not on_device:
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for plane in planes:
        for line in plane.lines:
            if not on_device and line.name == "python":
                continue
            events = [(e.start_ns, e.end_ns, e.name) for e in line.events
                      if on_device or not _HOST_NOISE.match(e.name)]
            for name, self_ns in self_times(events):
                acc = per_name[name]
                acc[0] += self_ns / 1e6
                acc[1] += 1
    kernels = sorted(((n, kind_of(n), ms / steps, c / steps) for n, (ms, c) in per_name.items()),
                     key=lambda k: -k[2])
    kinds: dict[str, float] = defaultdict(float)
    for _, kind, ms, _ in kernels:
        kinds[kind] += ms
    total = sum(kinds.values())
    return {"device": planes[0].name if planes else None, "on_device": on_device, "total_ms": total,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "kernels": kernels}


def format_summary(s: dict, top: int = 25) -> str:
    """A :func:`summarize` result as text: totals by kind, then the ``top`` kernels."""
    total = max(s["total_ms"], 1e-9)
    out = [f"trace: {s['device']} ({'device kernels' if s['on_device'] else 'host XLA ops'}), "
           f"{s['total_ms']:.2f} ms per step of busy time (streams/threads summed)"]
    out.append("by kind: " + ", ".join(f"{k} {ms:.2f} ms ({ms / total:.0%})" for k, ms in s["kinds"].items()))
    out.append(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kind            kernel")
    for name, kind, ms, count in s["kernels"][:top]:
        out.append(f"{ms:9.3f} {ms / total:6.1%} {count:6.0f}  {kind:<15} {name[:110]}")
    return "\n".join(out)
