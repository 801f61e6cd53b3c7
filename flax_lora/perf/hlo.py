"""Memory traffic of a compiled step, op by op, from XLA's optimized HLO text.

:func:`parse_module` reads the text of ``compiled.as_text()`` (computations, instructions, and
the stack-frame tables that map an op to its Python source line). :func:`traffic` then takes
every instruction the step executes (the entry computation, and each ``while`` body times its
trip count: ``known_trip_count`` when XLA knows it, else ``unknown_trips``) and estimates the
HBM bytes it reads and writes from operand and result shapes:

- a fusion reads each operand once and writes its result, except that an operand used only
  through dynamic-slice / slice / gather reads just the slices, and a dynamic-update-slice or
  scatter into an operand (in place) reads and writes only the update;
- bitcasts, tuples, parameters and constants move nothing.

Each op is labelled matmul (cuBLAS or Triton gemm fusions; their FLOPs are counted from the
dot shapes), attention (cuDNN custom calls) or by the notable ops inside it (transpose,
concatenate, convert, ...), and attributed to the innermost ``flax_lora`` source line in its
stack trace. :func:`report` sums the rows by category, label and source line.

It is an estimate of traffic, not a timing: it ignores L2 cache hits, recomputation inside
kernels, overlap of async copies with compute and launch overheads. ``benchmarks/hlo_bytes.py``
is the command line; its findings are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
        "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id", "iota"}
# ops named in an op's label, most telling first
NOTABLE = ("sort", "scatter", "gather", "dynamic-update-slice", "dynamic-slice", "concatenate", "transpose",
           "pad", "reduce-window", "reduce", "slice", "copy", "select", "convert", "broadcast")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: ``bf16[4,2048]{1,0}``, a tuple of them, ``f32[]``."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return int(total)


def shape_dims(shape: str) -> list[int]:
    """Dimensions of the first array in an HLO shape string."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: list[str] = field(default_factory=list)  # the operand texts, e.g. a parameter's number

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r'=("[^"]*"|%?[\w.\-$]+)', self.attrs)
        return m.group(1).strip('"').lstrip("%") if m else None

    @property
    def stack_frame(self) -> int | None:
        m = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return int(m.group(1)) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    by_name: dict[str, Instr] = field(default_factory=dict)

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])

    def users(self, name: str) -> list[Instr]:
        return [i for i in self.instrs if name in i.operands]


@dataclass
class Module:
    computations: dict[str, Computation]
    entry: str
    locations: dict[int, tuple[str, int, str]]  # file location id -> (file, line, function)
    frames: dict[int, tuple[int, int]]  # stack frame id -> (file location id, parent frame id or 0)

    def source(self, frame: int | None, prefer: str = "flax_lora/") -> str:
        """Innermost ``prefer`` file:line (function) on the stack of ``frame``, else the innermost."""
        chain, seen = [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            loc, parent = self.frames[frame]
            if loc in self.locations:
                chain.append(self.locations[loc])
            frame = parent
        for file, line, fn in chain:
            if prefer in file:
                return f"{file.split(prefer, 1)[1]}:{line} {fn}"
        return f"{Path(chain[0][0]).name}:{chain[0][1]} {chain[0][2]}" if chain else "?"


def _split_top(text: str, sep: str = ",") -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced: {text[start:start + 80]}")


def parse_instr(line: str) -> Instr | None:
    """One instruction line of a computation (None for anything else)."""
    s = line.strip()
    root = s.startswith("ROOT ")
    if root:
        s = s[5:]
    if not s.startswith("%") or " = " not in s:
        return None
    name, rest = s.split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, rest = rest.split(" ", 1)
    p = rest.index("(")
    opcode = rest[:p]
    end = _matching(rest, p)
    ops = [o.strip() for o in _split_top(rest[p + 1:end])]
    operands = [o.split()[-1].lstrip("%") for o in ops if o.strip() and "%" in o]
    return Instr(name.lstrip("%"), shape, opcode, operands, rest[end + 1:], root, ops)


def parse_module(text: str) -> Module:
    """The computations, entry and stack-frame tables of an optimized HLO module's text."""
    comps: dict[str, Computation] = {}
    entry, cur, section = None, None, None
    names: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}}
    locs_raw, frames = {}, {}
    for line in text.splitlines():
        if cur is None:
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = line
                continue
            m = re.match(r"(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
            if m and not line.startswith(" "):
                cur = Computation(m.group(2))
                comps[cur.name] = cur
                if m.group(1):
                    entry = cur.name
                section = None
                continue
            m = re.match(r"(\d+) (.*)$", line)
            if section and m:
                key, val = int(m.group(1)), m.group(2)
                if section in names:
                    names[section][key] = val.strip('"')
                elif section == "FileLocations":
                    locs_raw[key] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", val)}
                else:
                    f = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", val)}
                    # printed parent_frame_id is the parent's id + 1 (1 = no parent)
                    frames[key] = (f.get("file_location_id", 0), f.get("parent_frame_id", 1) - 1)
            continue
        if line.startswith("}"):
            cur = None
            continue
        ins = parse_instr(line)
        if ins is not None:
            cur.instrs.append(ins)
            cur.by_name[ins.name] = ins
    locations = {k: (names["FileNames"].get(v.get("file_name_id"), "?"), v.get("line", 0),
                     names["FunctionNames"].get(v.get("function_name_id"), "?")) for k, v in locs_raw.items()}
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(comps, entry, locations, frames)


def multiplicities(mod: Module, unknown_trips: int) -> dict[str, float]:
    """How many times each non-fused computation runs per step (while bodies x trip count)."""
    mult: dict[str, float] = defaultdict(float)

    def visit(name: str, m: float):
        mult[name] += m
        for ins in mod.computations[name].instrs:
            if ins.opcode == "while":
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
                n = int(t.group(1)) if t else unknown_trips
                visit(ins.attr("body"), m * n)
                visit(ins.attr("condition"), m * (n + 1))
            elif ins.opcode in ("call", "async-start"):
                called = ins.attr("to_apply") or ins.attr("calls")
                if called in mod.computations:
                    visit(called, m)
            elif ins.opcode == "conditional":  # every branch counted once: an upper bound
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                for c in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
                    visit(c, m)

    visit(mod.entry, 1.0)
    return dict(mult)


def _through_bitcasts(comp: Computation, name: str) -> list[Instr]:
    out = []
    for u in comp.users(name):
        out.extend(_through_bitcasts(comp, u.name) if u.opcode == "bitcast" else [u])
    return out


def _fused_traffic(mod: Module, ins: Instr, comp: Computation) -> tuple[int, int]:
    fused = mod.computations[ins.attr("calls")]
    params = {int(p.args[0]): p for p in fused.instrs if p.opcode == "parameter"}
    read = 0
    for i, op in enumerate(ins.operands):
        size = shape_bytes(comp.by_name[op].shape) if op in comp.by_name else 0
        p = params.get(i)
        users = _through_bitcasts(fused, p.name) if p is not None else []
        if users and all(u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] in _aliases(fused, p.name)
                         for u in users):
            read += sum(shape_bytes(u.shape) for u in users)
        elif users and all(u.opcode in ("dynamic-update-slice", "scatter") and u.operands[0] in _aliases(fused, p.name)
                           for u in users):
            pass  # updated in place: the update is counted where it is written
        else:
            read += size
    root = fused.root
    outs = [fused.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    if ins.opcode == "fusion-start":  # ((operands), result, context): only the result is written
        outs = [root]
    write = 0
    for o in outs:
        while o.opcode == "bitcast" and o.operands[0] in fused.by_name:
            o = fused.by_name[o.operands[0]]
        if o.opcode == "dynamic-update-slice":
            write += shape_bytes(fused.by_name[o.operands[1]].shape)
        elif o.opcode == "scatter":
            write += shape_bytes(fused.by_name[o.operands[-1]].shape)
        else:
            write += shape_bytes(o.shape)
    return read, write


def _aliases(comp: Computation, name: str) -> set[str]:
    out = {name}
    for u in comp.users(name):
        if u.opcode == "bitcast":
            out |= _aliases(comp, u.name)
    return out


def _dot_flops(dot: Instr, comp: Computation) -> float:
    lhs = comp.by_name.get(dot.operands[0])
    if lhs is None:
        return 0.0
    dims = shape_dims(lhs.shape)
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", dot.attrs)
    k = math.prod(dims[int(i)] for i in m.group(1).split(",") if i) if m else 1
    return 2.0 * math.prod(shape_dims(dot.shape)) * k


def _fused_ops(mod: Module, comp_name: str, seen=None) -> list[tuple[Instr, Computation]]:
    """(instruction, its computation) of a fused computation, nested fusions included."""
    seen = seen if seen is not None else set()
    if comp_name in seen or comp_name not in mod.computations:
        return []
    seen.add(comp_name)
    comp = mod.computations[comp_name]
    out = []
    for i in comp.instrs:
        out.append((i, comp))
        if i.opcode == "fusion":
            out.extend(_fused_ops(mod, i.attr("calls"), seen))
    return out


def classify(mod: Module, ins: Instr) -> tuple[str, str, float]:
    """(category, label, matmul FLOPs) of an executed instruction."""
    if ins.opcode == "custom-call":
        target = (ins.attr("custom_call_target") or "").strip('"')
        if "fmha" in target:
            return "attention", target, 0.0
        if "gemm" in target or "matmul" in target:
            return "matmul", target, 0.0
        return "other", f"custom-call {target}", 0.0
    if ins.opcode not in ("fusion", "fusion-start"):
        return "other", ins.opcode, 0.0
    ops = _fused_ops(mod, ins.attr("calls"))
    if any(o.opcode in ("dot", "convolution") for o, _ in ops):
        return "matmul", "gemm fusion", sum(_dot_flops(o, c) for o, c in ops if o.opcode == "dot")
    kinds = {o.opcode for o, _ in ops}
    if kinds <= {"parameter", "constant", "broadcast", "tuple", "bitcast", "iota"}:
        return "other", "broadcast (fill)", 0.0
    return "other", "+".join(k for k in NOTABLE if k in kinds) or "elementwise", 0.0


@dataclass
class Row:
    name: str
    category: str
    label: str
    source: str
    op_name: str
    count: float  # executions per step
    read: int  # bytes per execution
    write: int
    flops: float  # per execution (matmuls)
    shape: str

    @property
    def total(self) -> float:
        return self.count * (self.read + self.write)


def traffic(mod: Module, unknown_trips: int = 1) -> list[Row]:
    """One row per executed instruction that moves memory (see the module docstring)."""
    rows = []
    for comp_name, m in multiplicities(mod, unknown_trips).items():
        comp = mod.computations[comp_name]
        for ins in comp.instrs:
            if ins.opcode in FREE or ins.opcode.endswith("-done"):
                continue
            if ins.opcode in ("fusion", "fusion-start"):  # -start: an async fusion (-done moves nothing)
                read, write = _fused_traffic(mod, ins, comp)
            elif ins.opcode == "dynamic-update-slice":
                upd = shape_bytes(comp.by_name[ins.operands[1]].shape)
                read, write = upd, upd
            elif ins.opcode in ("dynamic-slice", "slice"):
                read = write = shape_bytes(ins.shape)
            else:
                read = sum(shape_bytes(comp.by_name[o].shape) for o in ins.operands if o in comp.by_name)
                write = shape_bytes(ins.shape)
            cat, label, flops = classify(mod, ins)
            rows.append(Row(ins.name, cat, label, mod.source(ins.stack_frame), ins.op_name.rsplit("/", 1)[-1],
                            m, read, write, flops, _short(ins.shape)))
    return rows


def _short(shape: str) -> str:
    return re.sub(r"\{[0-9,]*\}", "", shape)[:90]


def report(rows: list[Row], *, top: int = 15, bandwidth: float = 4.8e12, peak_flops: float = 989e12,
           tokens: int | None = None) -> dict:
    """Totals of ``rows`` (GB, and ms at ``bandwidth`` bytes/s; matmul FLOPs and ms at ``peak_flops``)
    by category, and of the non-matmul, non-attention ops by label and by source line; ``text``
    is the printed report, the other keys the same figures for JSON. ``tokens``: per step, for
    FLOPs per token. Defaults: an H200 (4.8 TB/s, 989 TFLOP/s dense bf16)."""
    gb = 1e9
    by_cat = defaultdict(float)
    for r in rows:
        by_cat[r.category] += r.total
    flops = sum(r.flops * r.count for r in rows)
    other = sorted((r for r in rows if r.category == "other"), key=lambda r: -r.total)
    by_label, by_source = defaultdict(float), defaultdict(float)
    for r in other:
        by_label[r.label] += r.total
        by_source[r.source] += r.total
    total = sum(by_cat.values())
    lines = []
    lines.append(f"{'bytes by category':<40} {'GB':>8} {'ms @ %.1f TB/s' % (bandwidth / 1e12):>15}")
    for cat, b in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cat:<38} {b / gb:8.2f} {b / bandwidth * 1e3:15.2f}")
    lines.append(f"  {'total':<38} {total / gb:8.2f} {total / bandwidth * 1e3:15.2f}")
    lines.append(f"matmul FLOPs (dots in gemm fusions): {flops / 1e12:.2f} TFLOP"
                 + (f" = {flops / tokens / 1e9:.2f} GFLOP/token" if tokens else "")
                 + f", {flops / peak_flops * 1e3:.1f} ms at {peak_flops / 1e12:.0f} TFLOP/s")
    lines.append("")
    lines.append(f"top {top} non-matmul, non-attention ops by bytes (x = executions per step):")
    lines.append(f"  {'op':<34} {'x':>4} {'MB/exec':>8} {'GB':>7} {'ms':>6}  {'what':<28} {'source':<36} shape")
    for r in other[:top]:
        lines.append(f"  {r.name[:34]:<34} {r.count:4.0f} {(r.read + r.write) / 1e6:8.1f} {r.total / gb:7.2f} "
                     f"{r.total / bandwidth * 1e3:6.2f}  {r.label[:28]:<28} {r.source[:36]:<36} {r.shape}")
    lines.append("")
    lines.append("non-matmul bytes by what the op does:")
    for k, b in sorted(by_label.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"  {k[:50]:<50} {b / gb:8.2f} GB {b / bandwidth * 1e3:6.2f} ms")
    lines.append("non-matmul bytes by source line:")
    for k, b in sorted(by_source.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {k[:60]:<60} {b / gb:8.2f} GB {b / bandwidth * 1e3:6.2f} ms")
    return {"text": "\n".join(lines), "by_category_gb": {k: v / gb for k, v in by_cat.items()},
            "total_gb": total / gb, "matmul_tflop": flops / 1e12,
            "by_label_gb": {k: v / gb for k, v in by_label.items()},
            "by_source_gb": {k: v / gb for k, v in by_source.items()},
            "top": [{"op": r.name, "count": r.count, "gb": r.total / gb, "what": r.label, "source": r.source,
                     "shape": r.shape} for r in other[:top]]}
