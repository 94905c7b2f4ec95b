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
