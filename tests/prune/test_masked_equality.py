"""Pruning without compensation equals the unpruned model with the same units zeroed (FFN neurons and attention heads).

The reference zeroes, in the unpruned model, the pruned neurons' up/gate output columns and down
input rows, and the pruned query heads' q columns and output-projection input rows.  Each test also
zeroes a different set of units and checks that this does NOT match, so it can fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.passes.cleanup import CleanupPass
from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass
from edgeprune.model_io import to_proto
from prune_models import HD, bert_proto, context, inputs, llama_proto

SIZES = [(1, 1), (2, 5), (3, 9)]
# per model: FFN producers (columns), FFN consumer (rows), query projection (+ its bias), output projection
LAYOUT = {
    "bert": {"up": ["w1", "b1"], "down": "w2", "q": ["wq", "bq"], "o": "wo"},
    "llama": {"up": ["wg", "wu"], "down": "wd", "q": ["wq"], "o": "wo"},
}


def _run(proto: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _weights(proto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _kept_columns(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Which columns of ``before`` survive in ``after`` (matched exactly, in order)."""
    kept = [next(i for i in range(before.shape[1]) if np.array_equal(before[:, i], after[:, j])) for j in range(after.shape[1])]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    return np.asarray(kept)


def _masked(proto, layout: dict, neurons: np.ndarray, heads: np.ndarray) -> onnx.ModelProto:
    """The unpruned model with ``neurons`` and query ``heads`` zeroed where they enter and leave."""
    channels = (np.asarray(heads)[:, None] * HD + np.arange(HD)).reshape(-1)
    cut = {name: (-1, neurons) for name in layout["up"]} | {layout["down"]: (0, neurons)}
    cut |= {name: (-1, channels) for name in layout["q"]} | {layout["o"]: (0, channels)}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in cut:
            axis, index = cut[t.name]
            arr = onnx.numpy_helper.to_array(t).copy()
            np.moveaxis(arr, axis, 0)[index] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    return out


def _prune(proto, **options):
    model = ir.from_proto(proto)
    CleanupPass()(model)
    result = StructuredPruningPass(PruneConfig(compensate=False, round_to=1, **options), context(proto))(model)
    CleanupPass()(model)
    return to_proto(model), result


def _other(pruned: np.ndarray, units: int) -> np.ndarray:
    """As many units as ``pruned``, but not the same set."""
    shifted = np.sort((pruned + 1) % units)
    assert set(shifted.tolist()) != set(pruned.tolist())
    return shifted


CASES = {
    "bert_dynamic": (lambda: bert_proto(shapes="dynamic"), "bert", {}),
    "bert_constant": (lambda: bert_proto(shapes="const"), "bert", {}),
    "llama_gqa": (llama_proto, "llama", {}),
    "llama_gqa_kv_groups": (llama_proto, "llama", {"kv_groups": True}),
}


@pytest.mark.parametrize("metric", ["flap", "wanda", "magnitude"])
@pytest.mark.parametrize("case", list(CASES))
def test_pruned_equals_the_masked_unpruned_model(case, metric):
    make, kind, options = CASES[case]
    proto = make()
    layout = LAYOUT[kind]
    pruned, result = _prune(proto, ratio=0.4, metric=metric, allocation="uniform", **options)
    ffn = next(r for r in result.records if r["kind"] == "ffn")
    attn = next(r for r in result.records if r["kind"] == "heads")
    heads = 4
    pruned_heads = np.setdiff1d(np.arange(heads), attn["heads_kept"])
    neurons = ffn["units_before"]
    kept = _kept_columns(_weights(proto)[layout["up"][0]], _weights(pruned)[layout["up"][0]])
    assert len(kept) == ffn["units_after"]
    pruned_neurons = np.setdiff1d(np.arange(neurons), kept)
    assert len(pruned_neurons) and len(pruned_heads)  # both kinds really lost units
    expected = _masked(proto, layout, pruned_neurons, pruned_heads)
    wrong = [_masked(proto, layout, _other(pruned_neurons, neurons), pruned_heads),
             _masked(proto, layout, pruned_neurons, _other(pruned_heads, heads))]  # fmt: skip
    for b, s in SIZES:
        feeds = inputs(b, s, seed=7)
        got = _run(pruned, feeds)
        np.testing.assert_allclose(got, _run(expected, feeds), rtol=1e-5, atol=1e-5)
        for other in wrong:  # the comparison can fail: zeroing other units gives another output
            assert not np.allclose(got, _run(other, feeds), rtol=1e-5, atol=1e-5)
