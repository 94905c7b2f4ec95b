"""Sibling MatMulNBits packed into one node: the same outputs bit for bit, only where every sibling agrees."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.model_io import model_bytes, to_proto
from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass
from edgeprune.passes.bits.pack import fold_into_attention, pack_siblings
from edgeprune.passes.bits.sensitivity import Option
from edgeprune.runtime.targets import get_target

K, T = 64, 5
NS = {"q": 64, "k": 32, "v": 48}


def _siblings(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x -> q/k/v MatMuls of different widths -> three outputs, and a fourth MatMul on another input."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N, {T}, {K}] x) => (float[N, {T}, {NS['q']}] q, float[N, {T}, {NS['k']}] k, float[N, {T}, {NS['v']}] v,
                                     float[N, {T}, 32] o) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            t = Tanh(x)
            o = MatMul(t, Wo)
        }}""")
    for name, n in (*NS.items(), ("o", 32)):
        w = rng.standard_normal((K, n)).astype(np.float32) * (1 + (name == "v"))
        proto.graph.initializer.append(onnx.numpy_helper.from_array(w, f"W{name}"))
    return proto


def _nbits(proto: onnx.ModelProto, bits: int = 4, level: int = 4, exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    for i, n in enumerate(proto.graph.node):
        n.name = n.name or f"n{i}_{n.output[0]}"
    quant = MatMulNBitsQuantizer(proto, bits=bits, block_size=32, is_symmetric=False, accuracy_level=level,
                                 nodes_to_exclude=[n.name for n in proto.graph.node if n.output[0] in exclude])
    quant.process()
    return quant.model.model


def _outputs(model, x) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in model.graph)


@pytest.mark.parametrize("bits, level, opset", [(4, 4, 17), (8, 4, 17), (4, 0, 17), (2, 0, 17), (4, 4, 11)])
def test_packed_siblings_compute_exactly_what_they_computed_apart(bits, level, opset):
    quantized = _nbits(_siblings(opset=opset), bits, level)
    model = ir.from_proto(quantized)
    assert pack_siblings(model) == {"groups": 1, "nodes": 3}
    assert _ops(model) == ["MatMulNBits", "MatMulNBits", "Split", "Tanh"]
    assert [v.name for v in model.graph.outputs] == ["q", "k", "v", "o"]
    packed = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.inputs[0].name == "x")
    assert packed.attributes.get_int("N") == sum(NS.values()) and packed.attributes.get_int("accuracy_level", 0) == level
    x = np.random.default_rng(1).standard_normal((1, T, K)).astype(np.float32)
    for apart, together in zip(_outputs(quantized, x), _outputs(model, x), strict=True):
        np.testing.assert_array_equal(together, apart)
    # The siblings' own initializers are gone: the file holds each weight once.
    names = set(model.graph.initializers)
    assert not any(n.startswith(("Wq", "Wk", "Wv")) and not n.endswith("_packed") for n in names)


def test_untyped_siblings_pack_into_a_model_that_serializes():
    """Siblings read by further ops carry no type (ORT's quantizer writes no value_info): the packed values stay
    untyped rather than typed None, and the model serializes and runs (MiniLM's q/k/v failed to serialize)."""
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {T}, {K}] x) => (float[N, {T}, 144] y) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            y = Concat <axis = -1> (q, k, v)
        }}""")
    rng = np.random.default_rng(4)
    for name, n in NS.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32), f"W{name}"))
    quantized = _nbits(proto)
    model = ir.from_proto(quantized)
    assert all(n.outputs[0].dtype is None for n in model.graph if n.op_type == "MatMulNBits")
    assert pack_siblings(model) == {"groups": 1, "nodes": 3}
    x = np.random.default_rng(1).standard_normal((2, T, K)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(model, x)[0], _outputs(quantized, x)[0])


def test_siblings_of_different_formats_or_shared_tables_stay_apart():
    # k stays float: q and v still pack, k is untouched.
    model = ir.from_proto(_nbits(_siblings(), exclude=("k",)))
    assert pack_siblings(model) == {"groups": 1, "nodes": 2}
    assert _ops(model) == ["MatMul", "MatMulNBits", "MatMulNBits", "Split", "Tanh"]
    # Different widths: q at 8 bits, k and v at 4 -> k and v pack.
    eight = _nbits(_siblings(), bits=8, exclude=("k", "v", "o"))
    model = ir.from_proto(_nbits(eight, bits=4))
    assert pack_siblings(model) == {"groups": 1, "nodes": 2}
    # A node named in ``exclude`` (already quantized in the input model) is left as it is.
    model = ir.from_proto(_nbits(_siblings()))
    names = {n.name for n in model.graph if n.op_type == "MatMulNBits"}
    assert pack_siblings(model, exclude=names) == {"groups": 0, "nodes": 0}
    # Where scales go to float16 next, a sibling whose scales float16 cannot hold stays apart (it keeps float32 ones).
    tiny = _siblings()
    wv = next(i for i in tiny.graph.initializer if i.name == "Wv")
    wv.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(wv) * 1e-7, "Wv"))
    model = ir.from_proto(_nbits(tiny))
    assert pack_siblings(model, fp16=True) == {"groups": 1, "nodes": 2}
    model = ir.from_proto(_nbits(tiny))
    assert pack_siblings(model) == {"groups": 1, "nodes": 3}
    # Before opset 11 Split has no negative axis: nothing is packed.
    assert pack_siblings(ir.from_proto(_nbits(_siblings(opset=10)))) == {"groups": 0, "nodes": 0}
    # An initializer another node also reads (a tied lookup's table) keeps its node apart.
    model = ir.from_proto(_nbits(_siblings()))
    q = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0].name == "q")
    reader = ir.Node("", "Identity", [q.inputs[1]], name="reader")
    model.graph.append(reader)
    model.graph.outputs.append(reader.outputs[0])
    reader.outputs[0].name = "table"
    assert pack_siblings(model) == {"groups": 1, "nodes": 2}


def _ctx(proto: onnx.ModelProto) -> CompileContext:
    rng = np.random.default_rng(7)
    rows = [{"x": rng.standard_normal((1, T, K)).astype(np.float32)} for _ in range(12)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("joint", [False, True])
def test_joint_siblings_take_one_format_and_are_packed(joint, fp16, monkeypatch):
    """With ``joint_siblings`` q/k/v form one unit: one format, emitted as one MatMulNBits; without, each its own
    (those that agree still pack).  Either way the outputs equal the same plan emitted without packing, bit for bit,
    and the file holds the bytes the solver predicted (packed scales go to float16 like any others)."""
    from edgeprune.passes.bits import emit as emit_mod

    proto = _siblings()
    cfg = BitAllocationConfig(avg_bits=6, bit_options=(4, 8), block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(4,), no_slower=False, fp16_scales=fp16, joint_siblings=joint)
    model = ir.from_proto(proto)
    result = BitAllocationPass(cfg, _ctx(proto))(model)
    formats = {r["layer"].split(":")[-1]: r["format"] for r in result.records}  # unnamed nodes: "MatMul:<output>"
    joint_units = {r["joint_unit"] for r in result.records}
    if joint:
        assert formats["q"] == formats["k"] == formats["v"] and len(joint_units - {None}) == 1
    else:  # on their own one of them takes 8 bits, the two others 4 (which still pack)
        assert sorted(formats[k] for k in NS) == ["nbits4-b32-asym-acc4"] * 2 + ["nbits8-b32-asym-acc4"]
    emitted = result.summary["emit"]
    assert emitted["packed_siblings"] == {"groups": 1, "nodes": 3 if joint else 2, "into_attention": 0}
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len([n for n in nbits if n.inputs[0].name == "x"]) == len({formats[k] for k in NS})
    if fp16:
        assert emitted["fp16_scales"] == {"converted": len(nbits), "kept_float32": 0}
    # The same plan emitted without packing: the same outputs, bit for bit.
    monkeypatch.setattr(emit_mod, "pack_siblings", lambda *a, **k: {"groups": 0, "nodes": 0})
    apart = ir.from_proto(proto)
    reference = BitAllocationPass(cfg, _ctx(proto))(apart)
    assert [r["format"] for r in reference.records] == [r["format"] for r in result.records]
    assert [n.op_type for n in apart.graph].count("MatMulNBits") == 4
    # The same weight bytes, plus the Split's sizes (int64 each): packed scales are stored like the siblings' own.
    assert model_bytes(model) == model_bytes(apart) + 8 * emitted["packed_siblings"]["nodes"]
    x = np.random.default_rng(2).standard_normal((1, T, K)).astype(np.float32)
    for want, got in zip(_outputs(apart, x), _outputs(model, x), strict=True):
        np.testing.assert_array_equal(got, want)


def _decode_steps(model: ir.Model) -> list[np.ndarray]:
    """Logits and cache of a 5-token prefill, then of one decode step on that cache."""
    session = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 2, 0, 16), np.float32)
    first = session.run(None, {"input_ids": np.array([[1, 2, 3, 4, 5]]), "attention_mask": np.ones((1, 5), np.int64),
                               "past_key_values.0.key": empty, "past_key_values.0.value": empty})
    second = session.run(None, {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 6), np.int64),
                                "past_key_values.0.key": first[1], "past_key_values.0.value": first[2]})
    return first + second


@pytest.mark.parametrize("option", [Option("nbits", 4, 32, False, 4), Option("int8-dynamic", 8)], ids=["nbits4", "int8-dyn"])
def test_packed_qkv_feed_the_attention_without_a_split(option, tmp_path, monkeypatch):
    """q/k/v of one format become one node whose output is GroupQueryAttention's packed query (key and value
    empty, no Split): a prefill and a decode step give the logits and cache of the same plan emitted with q/k/v
    apart, bit for bit.  Dynamic int8 is packed before quantizing (per-channel weights: exact), MatMulNBits after."""
    from tiny_models import genai_style_decoder

    from edgeprune.model_io import load_model
    from edgeprune.passes.bits import emit as emit_mod

    model = load_model(genai_style_decoder(tmp_path, packed=False))
    plan = {f"{x}_proj": option for x in "qkv"}
    new, log = emit_mod.emit(model, plan)
    ops = [n.op_type for n in new.graph]
    gqa = next(n for n in new.graph if n.op_type == "GroupQueryAttention")
    assert "Split" not in ops and gqa.inputs[1] is None and gqa.inputs[2] is None
    assert log["packed_siblings"]["into_attention"] == 1
    if option.kind == "nbits":
        assert ops.count("MatMulNBits") == 1 and log["packed_siblings"]["nodes"] == 3
        assert gqa.inputs[0].producer().op_type == "MatMulNBits"
    else:
        assert log["prepare"]["packed_int8_siblings"] == {"groups": 1, "nodes": 3}
        assert ops.count("MatMulInteger") == 1 and ops.count("DynamicQuantizeLinear") == 1
    monkeypatch.setattr(emit_mod, "pack_siblings", lambda *a, **k: {"groups": 0, "nodes": 0})
    monkeypatch.setattr(emit_mod, "pack_float_siblings", lambda *a, **k: {})
    apart, _ = emit_mod.emit(model, plan)
    assert [n.op_type for n in apart.graph].count("MatMulNBits" if option.kind == "nbits" else "MatMulInteger") == 3
    for want, got in zip(_decode_steps(apart), _decode_steps(new), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_split_the_attention_does_not_read_as_its_heads_stays(tmp_path):
    """Folding needs the Split's three outputs to be exactly the attention's query, key and value in its heads'
    widths: other heads, or a piece something else also reads, leave the Split in place."""
    from tiny_models import genai_style_decoder

    from edgeprune.model_io import load_model

    model = ir.from_proto(_nbits(to_proto(load_model(genai_style_decoder(tmp_path, packed=False)))))
    assert pack_siblings(model) == {"groups": 1, "nodes": 3}
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", 1)
    assert fold_into_attention(model) == 0
    gqa.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", 2)
    reader = ir.Node("", "Identity", [gqa.inputs[2]], name="reader")
    model.graph.append(reader)
    model.graph.outputs.append(reader.outputs[0])
    reader.outputs[0].name = "v_too"
    assert fold_into_attention(model) == 0
    model.graph.outputs.pop()
    model.graph.remove(reader, safe=True)
    assert fold_into_attention(model) == 1 and "Split" not in [n.op_type for n in model.graph]
