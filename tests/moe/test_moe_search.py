"""The ``loss`` metric: a masked router equals removing the experts, and the search equals a greedy reference over torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from moe_models import EXPERTS, LAYERS, prune_torch_experts, token_feed, torch_logits

from edgeprune.analysis import analyze
from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.model_io import load_model
from edgeprune.passes.moe import MoEConfig, MoEExpertPruningPass
from edgeprune.passes.moe.search import ROUND_SHARE, loss_search, mask_feeds, masked_model
from edgeprune.runtime.session import make_session
from edgeprune.runtime.targets import get_target


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)
    return float(-picked.sum()), picked.size


def _torch_loss(model, feeds, keeps) -> float:
    """Mean next-token NLL (numpy, float64) of torch's model with only ``keeps`` experts per layer."""
    pruned = prune_torch_experts(model, keeps)
    total = count = 0
    for feed in feeds:
        t, c = _nll(torch_logits(pruned, feed), feed["input_ids"])
        total, count = total + t, count + c
    return total / count


@pytest.mark.parametrize("keeps", [[[0, 3, 5], [1, 2, 4, 6, 7]], [[2, 6], [0, 1, 2, 3, 4, 5, 6]]])
def test_masked_router_equals_removing_the_experts(mixtral_loop_onnx, keeps):
    model = load_model(mixtral_loop_onnx)
    layers = analyze(model).moe_layers
    kept = np.zeros((LAYERS, EXPERTS), dtype=bool)
    for i, k in enumerate(keeps):
        kept[i, k] = True
    feed = token_feed(np.random.default_rng(3), 2, 9)
    masked = make_session(masked_model(model, layers), "cpu", threads=1)
    got = masked.run(["logits"], {**feed, **mask_feeds(layers, kept)})[0]
    pruned = make_session(MoEExpertPruningPass(MoEConfig(experts=keeps))(load_model(mixtral_loop_onnx)).model, "cpu", threads=1)
    want = pruned.run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    full = make_session(model, "cpu", threads=1).run(["logits"], feed)[0]
    assert np.abs(got - full).max() > 1e-3  # the mask changed the output: not a no-op passing by accident


def _reference_search(model, feeds, keep_total: int) -> tuple[list[list[int]], dict]:
    """The same schedule (each round drops ceil(share x what is left), cheapest first, ties to the lower layer/expert),
    every candidate scored by torch with the experts physically removed and the NLL in numpy."""
    kept = [list(range(EXPERTS)) for _ in range(LAYERS)]
    full = _torch_loss(model, feeds, kept)
    first = {}
    while sum(map(len, kept)) > keep_total:
        costs = []
        for i in range(LAYERS):
            if len(kept[i]) <= 1:
                continue
            for e in kept[i]:
                trial = [[x for x in k if not (j == i and x == e)] for j, k in enumerate(kept)]
                costs.append((_torch_loss(model, feeds, trial), i, e))
        if not first:
            first = {(i, e): c - full for c, i, e in costs}
        drop = max(1, math.ceil(ROUND_SHARE * (sum(map(len, kept)) - keep_total)))
        for _c, i, e in sorted(costs):
            if drop == 0:
                break
            if len(kept[i]) > 1:
                kept[i].remove(e)
                drop -= 1
    return kept, first


def test_loss_search_equals_greedy_reference_over_torch(mixtral, mixtral_loop_onnx):
    feeds = [token_feed(np.random.default_rng(seed), 2, 12) for seed in (0, 1)]
    model = load_model(mixtral_loop_onnx)
    layers = analyze(model).moe_layers
    found = loss_search(model, layers, CalibrationSet(feeds, "test"), 0.5, threads=1, batch_size=2)
    want, first = _reference_search(mixtral, feeds, EXPERTS * LAYERS // 2)
    assert [k.tolist() for k in found.keeps] == want
    assert found.rounds == 6 and found.evaluations == 16 + 14 + 12 + 11 + 10 + 9 + 2  # + the full and the final loss
    for (i, e), cost in first.items():
        assert found.first_costs[i][e] == pytest.approx(cost, abs=1e-5)
    assert found.loss_kept == pytest.approx(_torch_loss(mixtral, feeds, want), abs=1e-5)


def test_loss_metric_through_the_pass_uniform_and_per_layer_count(mixtral_loop_onnx):
    feeds = [token_feed(np.random.default_rng(seed), 2, 12) for seed in (0, 1)]
    calib = CalibrationSet(feeds, "test")
    context = CompileContext(get_target("cpu"), calib, calib)
    for config, counts in ((MoEConfig(keep=3, metric="loss"), [3, 3]), (MoEConfig(keep=0.25, metric="loss", allocation="uniform"), [2, 2])):
        result = MoEExpertPruningPass(config, context)(load_model(mixtral_loop_onnx))
        assert [r["units_after"] for r in result.records] == counts
        assert result.summary["search"]["objective"] == "next-token NLL"
        assert result.summary["search"]["evaluations"] > 2 * EXPERTS
        assert all(len(r["scores"]) == EXPERTS for r in result.records)
