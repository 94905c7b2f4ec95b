"""Tiny models built from ONNX text for the spine's tests (no files, no downloads)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir


def mlp_proto(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,4] -> MatMul W1 + b1 -> Relu -> MatMul W2 -> logits[N,3], with a foldable constant branch."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N, 4] x) => (float[N, 3] logits) {{
            two = Constant <value = float {{2.0}}> ()
            half = Constant <value = float {{0.5}}> ()
            one = Mul(two, half)
            h = MatMul(x, w1)
            hb = Add(h, b1)
            r = Relu(hb)
            y = MatMul(r, w2)
            same = Identity(y)
            logits = Mul(same, one)
        }}
        """
    )
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
            onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
            onnx.numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2"),
        ]
    )
    onnx.checker.check_model(proto)
    return proto


def write_mlp(folder: pathlib.Path, name: str = "mlp.onnx") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(mlp_proto(), path)
    return path


def write_mlp_calib(folder: pathlib.Path, n: int = 16, seed: int = 1) -> pathlib.Path:
    path = folder / "calib.npz"
    np.savez(path, x=np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32))
    return path


# A test-only pass that perturbs weights by a relative ``noise``: drives the accuracy-budget
# logic (back-off halves the noise; at 0 it is a no-op) without depending on a real pass.
import dataclasses  # noqa: E402

from edgeprune.passes.base import EdgePass, EdgePassResult  # noqa: E402


@dataclasses.dataclass
class NoiseConfig:
    noise: float = 0.5
    can_relax: bool = True


class NoisePass(EdgePass):
    name = "test-noise"
    Config = NoiseConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        if self.config.noise == 0:
            return EdgePassResult(model, modified=False)
        rng = np.random.default_rng(0)
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32 and array.ndim == 2:
                noisy = array + self.config.noise * np.abs(array).mean() * rng.standard_normal(array.shape).astype(np.float32)
                value.const_value = ir.Tensor(noisy, name=value.name)
        return EdgePassResult(model, modified=True, records=[{"layer": "all", "noise": self.config.noise}],
                              summary={"per_layer_chart": {"y": "noise", "ylabel": "relative noise"}})

    def relaxed(self, last=None):
        if not self.config.can_relax or self.config.noise == 0:
            return None
        noise = self.config.noise / 4 if self.config.noise > 0.01 else 0.0
        return NoisePass(NoiseConfig(noise=noise), self.context)


#: width and tokens of ``two_layer_matmul``
D, T = 64, 16


def two_layer_matmul(seed: int = 0) -> ir.Model:
    """x -> MatMul(A) -> Relu -> MatMul(B) -> y; A has heavy-tailed weights (outliers), B is Gaussian."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((D, D)).astype(np.float32)
    a[rng.random((D, D)) < 0.01] *= 25.0  # a few large weights stretch every 4-bit block they sit in
    b = rng.standard_normal((D, D)).astype(np.float32)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {T}, {D}] x) => (float[N, {T}, {D}] y) {{
            h = MatMul(x, A)
            r = Relu(h)
            y = MatMul(r, B)
        }}
        """
    )
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(a, "A"), onnx.numpy_helper.from_array(b, "B")])
    for i, n in enumerate(proto.graph.node):
        n.name = ["layerA", "relu", "layerB"][i]
    return ir.from_proto(proto)


def tiny_llama_with_past(folder: pathlib.Path, *, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> pathlib.Path:
    """A 2-layer random LLaMA (GQA when ``kv_heads < heads``) exported by optimum with past key/values.

    The weights are drawn wide (std 0.3) so greedy decoding does not settle on one token at once.
    """
    import warnings

    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(folder / "hf"), output=str(folder / "onnx"), task="text-generation-with-past", opset=17, do_validation=False)
    return folder / "onnx" / "model.onnx"


def genai_style_decoder(folder: pathlib.Path, seed: int = 0, *, packed: bool = True) -> pathlib.Path:
    """One decoder layer in onnxruntime-genai's builder form: ORT's SimplifiedLayerNormalization in the ONNX
    domain, packed QKV into com.microsoft.GroupQueryAttention with rotary inside, and a KV cache whose head
    size is the symbol ``kv_cache_dim`` (4 query heads, 2 KV heads of 16).  ``packed=False``: the same weights as
    three MatMuls (q, k, v) feeding the attention's query, key and value apart (``--fuse-attention``'s form)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    vocab, hidden, heads, kv, hd = 48, 64, 4, 2, 16
    w = {"embed": rng.standard_normal((vocab, hidden)), "ln_w": 1 + 0.1 * rng.standard_normal(hidden),
         "w_qkv": rng.standard_normal((hidden, (heads + 2 * kv) * hd)) / 8, "w_o": rng.standard_normal((heads * hd, hidden)) / 8,
         "w_lm": rng.standard_normal((hidden, vocab)) / 8}  # fmt: skip
    pos = np.arange(256)[:, None] * (10000.0 ** (-np.arange(0, hd, 2) / hd))[None, :]
    w["cos_cache"], w["sin_cache"] = np.cos(pos), np.sin(pos)
    if not packed:
        w["w_q"], w["w_k"], w["w_v"] = np.split(w.pop("w_qkv"), [heads * hd, (heads + kv) * hd], axis=1)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in w.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axes1"), numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.array(1, np.int64), "idx1")]  # fmt: skip
    cache = ["batch_size", kv, "past_sequence_length", "kv_cache_dim"]
    present = ["batch_size", kv, "total_sequence_length", "kv_cache_dim"]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("SimplifiedLayerNormalization", ["h", "ln_w"], ["n"], axis=-1, epsilon=1e-5),
        *([helper.make_node("MatMul", ["n", "w_qkv"], ["qkv"])] if packed else
          [helper.make_node("MatMul", ["n", f"w_{x}"], [x], name=f"{x}_proj") for x in "qkv"]),
        helper.make_node("ReduceSum", ["attention_mask", "axes1"], ["len"], keepdims=0),
        helper.make_node("Sub", ["len", "one"], ["len1"]),
        helper.make_node("Cast", ["len1"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mshape"]),
        helper.make_node("Gather", ["mshape", "idx1"], ["total64"], axis=0),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", (["qkv", "", ""] if packed else ["q", "k", "v"]) + ["past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total",
                                                 "cos_cache", "sin_cache"],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv,
                         do_rotary=1, scale=hd ** -0.5),  # fmt: skip
        helper.make_node("MatMul", ["attn", "w_o"], ["o"]),
        helper.make_node("Add", ["h", "o"], ["r"]),
        helper.make_node("MatMul", ["r", "w_lm"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "genai_style",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, present),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, present)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def tied_embedding_head(table: np.ndarray) -> ir.Model:
    """ids [2, 5] -> Gather(E) -> h -> MatMul(h, Transpose(E)) -> logits: a tied embedding and LM head over ``table`` [V, dim]."""
    vocab, dim = table.shape
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 5]))
    e = ir.Value(name="E", const_value=ir.tensor(np.asarray(table, dtype=np.float32)))
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, dim]))
    et = ir.Value(name="E_t")
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, vocab]))
    nodes = [
        ir.Node("", "Gather", [e, ids], outputs=[h], name="emb"),
        ir.Node("", "Transpose", [e], outputs=[et], attributes=[ir.AttrInt64s("perm", [1, 0])], name="tr"),
        ir.Node("", "MatMul", [h, et], outputs=[y], name="head"),
    ]
    return ir.Model(ir.Graph([ids], [y, h], nodes=nodes, initializers=[e], opset_imports={"": 17}), ir_version=8)
