"""What the prune pass tells ``edgeprune inspect`` (``EdgePass.describe``), the metric registry, and the repeat_kv match."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from conv_models import residual_proto
from edgeprune.inspection import _describe_passes
from edgeprune.passes.base import EdgePass
from edgeprune.passes.prune import StructuredPruningPass
from edgeprune.passes.prune.prune_pass import PruneConfig, find_groups
from edgeprune.passes.prune.scoring import METRICS
from prune_models import bert_proto, llama_proto, shared_ffn_proto

_PRUNE_TITLE = "prunable groups (prune pass defaults; --json lists each group)"
_PRUNE_COLUMNS = ["kind", "groups", "units", "skipped", "skipped because"]


def test_describe_of_a_transformer_layer():
    answer = StructuredPruningPass.describe(ir.from_proto(bert_proto()))
    assert answer == {
        "summary": ["prunable: 1 FFN group (64 neurons each), 1 head group (4 heads each); 0 skipped"],
        "fields": {
            "channel_groups": [],
            "prune_groups": [
                {"label": "0.ffn", "kind": "ffn", "layer": 0, "units": 64, "unit_size": 1, "unit_params": 65, "consumer": "MatMul:d0"},
                {"label": "0.heads", "kind": "heads", "layer": 0, "units": 4, "unit_size": 8, "unit_params": 1048, "consumer": "MatMul:o0"},
            ],
            "prune_skipped": [],
        },
        "tables": [(_PRUNE_TITLE, _PRUNE_COLUMNS, [("ffn", 1, "64 neurons each", 0, "-"), ("heads", 1, "4 heads each", 0, "-")])],
    }


def test_describe_of_a_residual_conv_net_lists_channel_groups_and_reasons():
    answer = StructuredPruningPass.describe(ir.from_proto(residual_proto()))
    residual = "residual: Add:a couple 2 convs on one residual stream, whose width is kept by default"
    assert answer["summary"] == ["1 of 3 channel groups prunable (24 channels)", "prunable: 1 conv group (24 channels each); 2 skipped"]
    assert answer["fields"]["channel_groups"][0] == {
        "name": "ws", "channels": 8, "producers": ["Conv:s", "Conv:p"], "depthwise": [], "consumers": ["Conv:h", "Conv:y"],
        "tensors": 12, "residual": True, "prunable": False, "reason": residual,
    }  # fmt: skip
    assert [g["name"] for g in answer["fields"]["channel_groups"]] == ["ws", "we", "wh"]
    assert answer["fields"]["prune_skipped"] == [
        {"label": "ws", "kind": "conv", "layer": 0, "reason": residual},
        {"label": "wh", "kind": "conv", "layer": 2, "reason": "tensor y is a graph output"},
    ]
    channel_table, prune_table = answer["tables"]
    assert channel_table[2] == [("ws", 8, 2, 0, 2, "residual"), ("we", 24, 1, 0, 1, "yes"), ("wh", 10, 1, 0, 0, "tensor y is a graph output")]
    # the reason loses its one-word prefix, so equal reasons of different groups count together
    assert prune_table[2] == [("conv", 1, "24 channels each", 2, "Add:a couple 2 convs on one residual stream, whose width is kept by default; tensor y is a graph output")]


def test_describe_counts_equal_skip_reasons_together_and_agrees_with_find_groups():
    model = ir.from_proto(shared_ffn_proto())
    answer = StructuredPruningPass.describe(model)
    assert answer["summary"] == ["prunable: nothing; 2 skipped"]
    assert answer["tables"] == [(_PRUNE_TITLE, _PRUNE_COLUMNS, [("ffn", 0, "-", 2, "weight w_down is shared by several nodes, so it is not pruned (x2)")])]
    groups, skipped = find_groups(model)
    assert (answer["fields"]["prune_groups"], answer["fields"]["prune_skipped"]) == (groups, skipped)


def test_inspect_asks_the_registered_passes_and_only_prune_answers_today():
    assert EdgePass.describe(ir.from_proto(bert_proto())) is None
    answers = _describe_passes(ir.from_proto(bert_proto()))
    assert answers == [StructuredPruningPass.describe(ir.from_proto(bert_proto()))]


def test_one_metric_registry_feeds_the_config_and_the_cli():
    from edgeprune.cli import compile_cmd

    assert list(METRICS) == ["flap", "wanda", "magnitude", "magnitude_l1"]
    assert {name for name, m in METRICS.items() if m.needs_stats} == {"flap", "wanda"}
    assert [name for name, m in METRICS.items() if m.producer_stats] == ["wanda"]
    option = next(p for p in compile_cmd.params if p.name == "prune_metric")
    assert list(option.type.choices) == list(METRICS)
    for name in METRICS:
        assert PruneConfig(metric=name).metric == name


def _with_identity_after_expand(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The K repeat's Expand feeds an Identity before the Reshape: not the exporters' repeat_kv."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = list(out.graph.node)
    reshape = next(n for n in nodes if n.op_type == "Reshape" and n.input[0] == "ke")
    reshape.input[0] = "ke_id"
    nodes.insert(nodes.index(reshape), onnx.helper.make_node("Identity", ["ke"], ["ke_id"]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def test_a_gqa_repeat_that_is_not_unsqueeze_expand_reshape_is_skipped_with_the_reason():
    groups, skipped = find_groups(ir.from_proto(_with_identity_after_expand(llama_proto())), PruneConfig(units="heads"))
    assert groups == []
    assert skipped == [{"label": "0.heads", "kind": "heads", "layer": 0, "reason": "attention 0: GQA repeat of k heads is not Unsqueeze -> Expand -> Reshape"}]
    found, _ = find_groups(ir.from_proto(llama_proto()), PruneConfig(units="heads"))
    assert [(g["label"], g["units"]) for g in found] == [("0.heads", 4)]
