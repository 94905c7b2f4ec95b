"""What pruning says when it finds little or nothing, and what it counts (issue 10, defect 7).

- A model with nothing prunable gets one behaviour whatever the reason: exit 2 and one sentence,
  with the groups left out counted by reason (not one warning per group).
- When some groups are pruned, the ones left out are summarized in one log line.
- ``prunable_params`` counts every weight once: a conv weight that is one group's consumer and the
  next group's producer, or a weight two convs share, is not counted twice, so it can never exceed
  the model's parameters; ``removed_params`` is exactly what the model lost.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgeprune.cli import main
from edgeprune.errors import UnsupportedModelError
from edgeprune.model_io import param_count
from edgeprune.passes.prune import PruneConfig, StructuredPruningPass

from conv_models import image_context

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _w(rng, *shape) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _proto(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(_HEADER + text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    return proto


def _lrn_proto(prunable_first: bool) -> onnx.ModelProto:
    """[conv a -> Relu ->] conv b -> LRN (no pruning rule) -> conv c -> y: only a's channels can go."""
    rng = np.random.default_rng(0)
    first = "h = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)\n        r = Relu (h)\n        hb = Conv (r, wb, bb)" if prunable_first else \
        "hb = Conv <pads = [1, 1, 1, 1]> (x, wb0, bb)"
    weights = {"wb": _w(rng, 8, 8, 1, 1), "wb0": _w(rng, 8, 4, 3, 3), "bb": _w(rng, 8, 1)[:, 0], "wc": _w(rng, 6, 8, 1, 1),
               "wa": _w(rng, 8, 4, 3, 3), "ba": _w(rng, 8, 1)[:, 0]}  # fmt: skip
    text = f"""
    g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        {first}
        n = LRN <size = 3> (hb)
        y = Conv (n, wc)
    }}"""
    used = {"wb", "bb", "wc", "wa", "ba"} if prunable_first else {"wb0", "bb", "wc"}
    return _proto(text, {k: v for k, v in weights.items() if k in used})


def _save(proto, folder):
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "m.onnx")
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal([16] + shape[1:]).astype(np.float32))
    return folder / "m.onnx", folder / "calib.npz"


def _compile(capsys, tmp_path, proto, *args):
    model, calib = _save(proto, tmp_path / "in")
    out = tmp_path / "out"
    code = main([str(a) for a in ("compile", model, "-o", out, "--calib", calib, *args)])
    captured = capsys.readouterr()
    return code, captured.err, out


FIX = "drop --prune (or the prune pass from the recipe) for this model."


def test_nothing_prunable_because_every_group_is_left_out_exits_2_with_one_sentence(tmp_path, capsys, caplog):
    # Before: exit 0, an unchanged model, and one warning per group left out.
    caplog.set_level(logging.INFO)
    code, err, out = _compile(capsys, tmp_path, _lrn_proto(prunable_first=False), "--prune", "0.2")
    assert code == 2, err
    assert err.splitlines()[-1] == ("error: prune found nothing it can prune in this model: 2 groups left out "
                                    "(1 x LRN node reads the channels and has no pruning rule; 1 x tensor is a graph output): " + FIX)
    assert not out.exists()
    assert not [r for r in caplog.records if r.name.startswith("edgeprune.passes.prune") and r.levelno >= logging.WARNING]


def test_nothing_prunable_because_nothing_is_recognized_exits_2_with_the_same_sentence(tmp_path, capsys):
    proto = _proto("""
    g (float[N, 4] x) => (float[N, 4] y) {
        m = Mul (x, s)
        y = Add (m, x)
    }""", {"s": np.full(4, 0.5, np.float32)})
    code, err, out = _compile(capsys, tmp_path, proto, "--prune", "0.2")
    assert code == 2, err
    assert err.splitlines()[-1] == ("error: prune found nothing it can prune in this model (no FFN block of constant-weight MatMul/Gemm around "
                                    "an activation, no Softmax attention with q/k/v/o projections, no Conv with a constant weight; the model's "
                                    "ops are Add, Mul): " + FIX)
    assert not out.exists()


def test_groups_left_out_are_summarized_in_one_line(caplog):
    proto = _lrn_proto(prunable_first=True)
    caplog.set_level(logging.INFO, logger="edgeprune.passes.prune")
    result = StructuredPruningPass(PruneConfig(ratio=0.25, round_to=1), image_context(proto))(ir.from_proto(proto))
    assert result.modified
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edgeprune.passes.prune") and r.levelno >= logging.WARNING]
    assert lines == ["prune: left out 2 of 3 groups (1 x LRN node reads the channels and has no pruning rule; 1 x tensor is a graph output)"]
    assert len(result.summary["skipped"]) == 2  # the full reasons stay in the report


def _chain_proto() -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 (big) -> Relu -> conv3 -> y: conv2's weight is group 1's consumer and group 2's producer."""
    rng = np.random.default_rng(0)
    return _proto("""
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
        rb = Relu (b)
        y = Conv (rb, w3, b3)
    }""", {"w1": _w(rng, 32, 3, 3, 3), "b1": _w(rng, 32, 1)[:, 0], "w2": _w(rng, 32, 32, 3, 3), "b2": _w(rng, 32, 1)[:, 0],
           "w3": _w(rng, 4, 32, 1, 1), "b3": _w(rng, 4, 1)[:, 0]})


def _shared_proto() -> onnx.ModelProto:
    """Two branches conv1/conv1b -> Relu -> conv2/conv2b, where conv2 and conv2b share one (big) weight."""
    rng = np.random.default_rng(0)
    return _proto("""
    g (float[N, 3, 8, 8] x) => (float[N, 16, 8, 8] y1, float[N, 16, 8, 8] y2) {
        a = Conv (x, w1, b1)
        ra = Relu (a)
        y1 = Conv <pads = [1, 1, 1, 1]> (ra, ws, bs)
        c = Conv (x, w1b, b1b)
        rc = Relu (c)
        y2 = Conv <pads = [1, 1, 1, 1]> (rc, ws, bs)
    }""", {"w1": _w(rng, 16, 3, 1, 1), "b1": _w(rng, 16, 1)[:, 0], "w1b": _w(rng, 16, 3, 1, 1), "b1b": _w(rng, 16, 1)[:, 0],
           "ws": _w(rng, 16, 16, 3, 3), "bs": _w(rng, 16, 1)[:, 0]})


def test_prunable_params_count_each_weight_once():
    # conv2's weight loses input channels to group 1 and filters to group 2: its elements count once.
    # Before: 19,488 "prunable" parameters in a model of 10,276.
    proto = _chain_proto()
    model = ir.from_proto(proto)
    before = param_count(model)
    result = StructuredPruningPass(PruneConfig(ratio=0.3, round_to=1), image_context(proto))(model)
    s = result.summary
    assert s["prunable_params"] == 32 * 3 * 9 + 32 + 32 * 32 * 9 + 32 + 4 * 32 <= s["params_before"] == before  # all but b3 (y is an output)
    assert result.modified and 0 < s["removed_share"] == s["removed_params"] / s["prunable_params"] <= 1


def test_a_conv_weight_two_convs_share_is_not_pruned():
    # Before: both groups pruned the shared weight, which unshared it: 2,448 parameters became 3,288,
    # while the summary said 4,736 were prunable and 1,192 removed.
    proto = _shared_proto()
    with pytest.raises(UnsupportedModelError) as err:
        StructuredPruningPass(PruneConfig(ratio=0.3, round_to=1), image_context(proto))(ir.from_proto(proto))
    assert str(err.value) == ("prune found nothing it can prune in this model: 4 groups left out (2 x weight is shared by several nodes, "
                              "so it is not pruned; 2 x tensor is a graph output): drop --prune (or the prune pass from the recipe) for this model.")


def test_removed_params_is_what_the_model_lost():
    proto = _chain_proto()
    model = ir.from_proto(proto)
    before = param_count(model)
    s = StructuredPruningPass(PruneConfig(ratio=0.3, round_to=1), image_context(proto))(model).summary
    # Both groups prune conv2's weight (its inputs and its filters): the elements in both are removed once.
    assert s["removed_params"] == s["params_before"] - s["params_after"] == before - param_count(model) > 0
