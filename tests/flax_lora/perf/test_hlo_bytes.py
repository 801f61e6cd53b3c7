"""flax_lora.perf.hlo (behind benchmarks/hlo_bytes.py): parsing optimized HLO text and counting the
bytes each op moves."""

from __future__ import annotations

import pytest

from flax_lora.perf import hlo as hb

# A trimmed-down version of what XLA:GPU prints for a scanned step: a while loop with a known
# trip count whose body slices a stacked weight, runs a gemm, a cuDNN attention call and an
# async in-place dynamic-update-slice into a stacked residual; a loop with an unknown trip
# count; stack frames pointing into flax_lora.
HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/repo/flax_lora/train.py"
2 "/repo/flax_lora/models/llama.py"
3 "/site-packages/flax/linen/linear.py"

FunctionNames
1 "step"
2 "MLP.__call__"
3 "Dense.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=128 end_line=128 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=255 end_line=255 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=290 end_line=290 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=3 parent_frame_id=1}

%fused_slice (p0: bf16[16,64,32], p1: s32[]) -> bf16[64,32] {
  %p0 = bf16[16,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  %ds = bf16[1,64,32]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,32}
  ROOT %bc = bf16[64,32]{1,0} bitcast(%ds)
}

%gemm_computation (a: bf16[128,64], b: bf16[64,32]) -> bf16[128,32] {
  %a = bf16[128,64]{1,0} parameter(0)
  %b = bf16[64,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (q0: bf16[16,128,32], q1: s32[], q2: bf16[128,32]) -> bf16[16,128,32] {
  %q0 = bf16[16,128,32]{2,1,0} parameter(0)
  %q2 = bf16[128,32]{1,0} parameter(2)
  %up = bf16[1,128,32]{2,1,0} bitcast(%q2)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %dus = bf16[16,128,32]{2,1,0} dynamic-update-slice(%q0, %up, %q1, %z, %z)
}

%fused_concat (r0: bf16[128,32]) -> f32[128,64] {
  %r0 = bf16[128,32]{1,0} parameter(0)
  %cv = f32[128,32]{1,0} convert(%r0)
  ROOT %cat = f32[128,64]{1,0} concatenate(%cv, %cv), dimensions={1}
}

%fused_zeros () -> bf16[16,128,32] {
  %zero = bf16[] constant(0)
  ROOT %bz = bf16[16,128,32]{2,1,0} broadcast(%zero), dimensions={}
}

%body (t: (s32[], bf16[128,64], bf16[16,64,32], bf16[16,128,32])) -> (s32[], bf16[128,64], bf16[16,64,32], bf16[16,128,32]) {
  %t = (s32[], bf16[128,64]{1,0}, bf16[16,64,32]{2,1,0}, bf16[16,128,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[128,64]{1,0} get-tuple-element(%t), index=1
  %w = bf16[16,64,32]{2,1,0} get-tuple-element(%t), index=2
  %res = bf16[16,128,32]{2,1,0} get-tuple-element(%t), index=3
  %wl = bf16[64,32]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/dynamic_slice" stack_frame_id=1}
  %y = bf16[128,32]{1,0} fusion(%x, %wl), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/mlp/dot_general" stack_frame_id=3}
  %att = (bf16[128,32]{1,0}, u8[0]{0}) custom-call(%y, %y, %y), custom_call_target="__cudnn$fmhaSoftmax", metadata={stack_frame_id=4}
  %cat = f32[128,64]{1,0} fusion(%y), kind=kInput, calls=%fused_concat, metadata={op_name="jit(step)/mlp/concatenate" stack_frame_id=2}
  %fs = ((bf16[16,128,32]{2,1,0}, s32[], bf16[128,32]{1,0}), bf16[16,128,32]{2,1,0}, u32[]) fusion-start(%res, %i, %y), kind=kLoop, calls=%fused_dus
  %fd = bf16[16,128,32]{2,1,0} fusion-done(%fs)
  ROOT %out = (s32[], bf16[128,64]{1,0}, bf16[16,64,32]{2,1,0}, bf16[16,128,32]{2,1,0}) tuple(%i, %x, %w, %fd)
}

%cond (c: (s32[], bf16[128,64], bf16[16,64,32], bf16[16,128,32])) -> pred[] {
  %c = (s32[], bf16[128,64]{1,0}, bf16[16,64,32]{2,1,0}, bf16[16,128,32]{2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%body2 (u: (s32[], f32[256])) -> (s32[], f32[256]) {
  %u = (s32[], f32[256]{0}) parameter(0)
  %v = f32[256]{0} get-tuple-element(%u), index=1
  %neg = f32[256]{0} negate(%v)
  %j = s32[] get-tuple-element(%u), index=0
  ROOT %o = (s32[], f32[256]{0}) tuple(%j, %neg)
}

%cond2 (k: (s32[], f32[256])) -> pred[] {
  %k = (s32[], f32[256]{0}) parameter(0)
  ROOT %q = pred[] constant(true)
}

ENTRY %main (x0: bf16[128,64], w0: bf16[16,64,32], v0: f32[256]) -> bf16[16,128,32] {
  %x0 = bf16[128,64]{1,0} parameter(0)
  %w0 = bf16[16,64,32]{2,1,0} parameter(1)
  %v0 = f32[256]{0} parameter(2)
  %zeros = bf16[16,128,32]{2,1,0} fusion(), kind=kLoop, calls=%fused_zeros, metadata={stack_frame_id=1}
  %i0 = s32[] constant(0)
  %init = (s32[], bf16[128,64]{1,0}, bf16[16,64,32]{2,1,0}, bf16[16,128,32]{2,1,0}) tuple(%i0, %x0, %w0, %zeros)
  %loop = (s32[], bf16[128,64]{1,0}, bf16[16,64,32]{2,1,0}, bf16[16,128,32]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
  %init2 = (s32[], f32[256]{0}) tuple(%i0, %v0)
  %loop2 = (s32[], f32[256]{0}) while(%init2), condition=%cond2, body=%body2
  ROOT %r = bf16[16,128,32]{2,1,0} get-tuple-element(%loop), index=3
}
"""


def test_shape_bytes():
    assert hb.shape_bytes("bf16[4,2048]{1,0}") == 4 * 2048 * 2
    assert hb.shape_bytes("f32[]") == 4
    assert hb.shape_bytes("(s32[], bf16[16,128,32]{2,1,0}, /*index=2*/u8[0]{0})") == 4 + 16 * 128 * 32 * 2
    assert hb.shape_bytes("pred[8]") == 8


def test_parse_instruction_with_tuple_shape_and_attributes():
    ins = hb.parse_instr('  %fs = ((bf16[2]{0}, s32[]), bf16[2]{0}, u32[]) fusion-start(%a, %b), kind=kLoop, '
                         'calls=%f, custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="x/y/add" stack_frame_id=7}')
    assert (ins.name, ins.opcode, ins.operands) == ("fs", "fusion-start", ["a", "b"])
    assert ins.attr("calls") == "f"
    assert ins.attr("custom_call_target") == "__cudnn$fmhaSoftmax"
    assert ins.op_name == "x/y/add" and ins.stack_frame == 7


def test_trip_counts_and_byte_rules():
    mod = hb.parse_module(HLO)
    assert mod.entry == "main"
    mult = hb.multiplicities(mod, unknown_trips=5)
    assert mult["body"] == 16 and mult["body2"] == 5 and mult["main"] == 1
    rows = {r.name: r for r in hb.traffic(mod, unknown_trips=5)}
    w_slice = 64 * 32 * 2
    # a stacked operand read through dynamic-slice: only the slice is read
    assert (rows["wl"].read, rows["wl"].write, rows["wl"].count) == (w_slice + 4, w_slice, 16)  # + the index
    assert rows["wl"].label == "dynamic-slice"
    # gemm: a matmul with its FLOPs
    assert rows["y"].category == "matmul" and rows["y"].flops == 2 * 128 * 32 * 64
    assert rows["y"].read == 128 * 64 * 2 + w_slice and rows["y"].write == 128 * 32 * 2
    assert rows["att"].category == "attention"
    # async in-place dynamic-update-slice: reads and writes the update only, not the stack
    upd = 128 * 32 * 2
    assert (rows["fs"].read, rows["fs"].write) == (upd + 4, upd)
    assert "fd" not in rows and "out" not in rows  # -done, tuple: nothing moved
    assert rows["cat"].label == "concatenate+convert" and rows["cat"].write == 128 * 64 * 4
    assert rows["zeros"].label == "broadcast (fill)" and rows["zeros"].read == 0
    assert rows["neg"].count == 5
    # sources: the innermost flax_lora frame on the stack (printed parent ids are id + 1), else
    # the innermost frame
    assert rows["cat"].source == "models/llama.py:255 MLP.__call__"
    assert rows["y"].source == "models/llama.py:255 MLP.__call__"  # linear.py <- llama.py <- train.py
    assert rows["att"].source == "linear.py:290 Dense.__call__"
    assert rows["wl"].source == "train.py:128 step"


def test_report_totals():
    rows = hb.traffic(hb.parse_module(HLO), unknown_trips=5)
    out = hb.report(rows, top=3, tokens=128)
    assert out["total_gb"] == pytest.approx(sum(r.total for r in rows) / 1e9)
    assert out["matmul_tflop"] == pytest.approx(16 * 2 * 128 * 32 * 64 / 1e12)
    assert len(out["top"]) == 3 and all(t["gb"] >= out["top"][-1]["gb"] for t in out["top"])
    assert "top 3 non-matmul" in out["text"]
