"""FFN blocks and the one table of ops that may lie between an FFN's up and down linears.

An FFNBlock is up linear -> element-wise activation region -> down linear, or, gated (SwiGLU,
GeGLU), ``act(gate(x)) * up(x) -> down``; its hidden width is what structured pruning removes.
``ELEMENTWISE_OPS`` is the only list of ops allowed in that region: the finder here walks over
them, and the prune pass (``passes/prune/groups.py``) reads the same table to decide that an
FFN can be narrowed, so a block analysis reports is never skipped for its activation.  Every op
in it acts on each hidden unit separately (constants broadcast per unit; the prune pass checks
their shapes), which is why removing a hidden unit removes exactly that unit's path.

The activation is named with onnxscript rewriter patterns, used for matching only (erf-GELU,
tanh-GELU, SiLU, quick-GELU in the forms exporters decompose them into), and otherwise by the
region's op types through the table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._pattern_ir import _to_graph_pattern

from edgeprune.analysis.graph import MS_DOMAIN, STD_DOMAINS, constant, consumers, values_by_name, walk
from edgeprune.analysis.linears import Linear


@dataclasses.dataclass
class FFNBlock:
    """up -> activation -> down (gated: act(gate) * up -> down); ``hidden`` is the prunable width."""

    up: Linear
    gate: Linear | None
    down: Linear
    activation: str
    hidden: int
    gated: bool
    layer: int = -1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the activation table


@dataclasses.dataclass(frozen=True)
class ElementwiseOp:
    """How one op type counts inside an FFN region."""

    activation: str | None  # the FFN's activation name when this op is its activation; None for arithmetic
    nonlinear: bool  # an FFN needs at least one nonlinear op between up and down
    domains: tuple[str, ...] = STD_DOMAINS


def _arith() -> ElementwiseOp:
    return ElementwiseOp(None, nonlinear=False)


def _act(name: str | None, domains: tuple[str, ...] = STD_DOMAINS) -> ElementwiseOp:
    return ElementwiseOp(name, nonlinear=True, domains=domains)


_MS = (MS_DOMAIN,)
ELEMENTWISE_OPS: dict[str, ElementwiseOp] = {
    "Add": _arith(), "Sub": _arith(), "Mul": _arith(), "Div": _arith(), "Neg": _arith(), "Cast": _arith(),
    "Identity": _arith(),
    "Gelu": _act("gelu", STD_DOMAINS + _MS), "FastGelu": _act("gelu_tanh", _MS), "BiasGelu": _act("gelu", _MS),
    "QuickGelu": _act("quick_gelu", _MS),
    "Relu": _act("relu"), "LeakyRelu": _act("leaky_relu"), "Silu": _act("silu"), "Swish": _act("silu"),
    "HardSwish": _act("hardswish"), "HardSigmoid": _act("hardsigmoid"), "Clip": _act("clip"), "Elu": _act("elu"),
    "Selu": _act("selu"), "Celu": _act("celu"), "Softplus": _act("softplus"), "Mish": _act("mish"),
    "PRelu": _act("prelu"), "Tanh": _act("tanh"), "Sigmoid": _act("sigmoid"),
    "Erf": _act(None), "Exp": _act(None), "Pow": _act(None), "Sqrt": _act(None), "Abs": _act(None),
    "Softsign": _act(None), "Min": _act(None), "Max": _act(None), "ThresholdedRelu": _act(None),
}  # fmt: skip
NONLINEAR_OPS = frozenset(op for op, e in ELEMENTWISE_OPS.items() if e.nonlinear)
# Parts of larger activations (tanh-GELU, SiLU): they name the block only when nothing else does.
_PARTIAL_ACTIVATIONS = {"Tanh", "Sigmoid"}


def elementwise_op(node: ir.Node) -> ElementwiseOp | None:
    """The table entry for ``node``, or None when it may not lie inside an FFN region."""
    entry = ELEMENTWISE_OPS.get(node.op_type)
    return entry if entry is not None and node.domain in entry.domains else None


def activation_name(op_type: str) -> str:
    """The activation name of an op type (its lower-cased op type when the table has none)."""
    entry = ELEMENTWISE_OPS.get(op_type)
    return entry.activation if entry is not None and entry.activation else op_type.lower()


# --------------------------------------------------------------------------- activation patterns

# Match-only patterns (pattern.Pattern: no replacement).  Constants are pattern variables checked
# by value in the condition, because exported graphs keep scalars in Constant nodes, which the
# rewriter's literal constants do not look through (and analysis must not lift them in the
# caller's model).


def _erf_gelu(op, x, c_sqrt2, c_one, c_half):
    return (x * (op.Erf(op.Div(x, c_sqrt2)) + c_one)) * c_half


def _erf_gelu_half_inside(op, x, c_sqrt2, c_one, c_half):
    return x * ((op.Erf(op.Div(x, c_sqrt2)) + c_one) * c_half)


def _erf_gelu_inv_sqrt2(op, x, c_inv_sqrt2, c_one, c_half):
    return (x * (op.Erf(op.Mul(x, c_inv_sqrt2)) + c_one)) * c_half


def _tanh_gelu(op, x, c_three, c_coef, c_sqrt_2_pi, c_one, c_half):
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, c_three), c_coef)), c_sqrt_2_pi)
    return (x * (op.Tanh(inner) + c_one)) * c_half


def _quick_gelu(op, x, c_1702):
    return x * op.Sigmoid(op.Mul(x, c_1702))


def _silu(op, x):
    return x * op.Sigmoid(x)


_EXPECTED_CONSTANTS = {
    "c_sqrt2": math.sqrt(2.0), "c_inv_sqrt2": 1.0 / math.sqrt(2.0), "c_one": 1.0, "c_half": 0.5,
    "c_three": 3.0, "c_coef": 0.044715, "c_sqrt_2_pi": math.sqrt(2.0 / math.pi), "c_1702": 1.702,
}  # fmt: skip


def _constants_match(context, **bindings) -> pattern.MatchResult:
    """Every bound ``c_*`` variable is a scalar constant close to its expected value."""
    result = pattern.MatchResult()
    for name, value in bindings.items():
        if not name.startswith("c_"):
            continue
        tensor = constant(value)
        if tensor is None or tensor.size != 1:
            return result.fail(f"{name} is not a scalar constant", value)
        got = float(tensor.numpy().reshape(-1)[0])
        if not math.isclose(got, _EXPECTED_CONSTANTS[name], rel_tol=1e-3):
            return result.fail(f"{name} is {got}, expected {_EXPECTED_CONSTANTS[name]}", value)
    return result


def _match_patterns(*fns) -> list[pattern.Pattern]:
    """All commuted variants of the patterns (Mul/Add operand order varies between exporters).

    ``pattern.Pattern`` takes a GraphPattern; onnxscript 0.7.2 builds the commuted variants only on
    ``GraphPattern`` (as ``RewriteRule.commute`` does), which its public ``pattern`` module does not export.
    """
    return [
        pattern.Pattern(g, _constants_match, name=fn.__name__.lstrip("_"))
        for fn in fns
        for g in _to_graph_pattern(fn).commute()
    ]


ACTIVATION_PATTERNS: dict[str, list[pattern.Pattern]] = {
    "gelu_erf": _match_patterns(_erf_gelu, _erf_gelu_half_inside, _erf_gelu_inv_sqrt2),
    "gelu_tanh": _match_patterns(_tanh_gelu),
    "quick_gelu": _match_patterns(_quick_gelu),
    "silu": _match_patterns(_silu),
}


def match_activation(model: ir.Model, node: ir.Node, x: ir.Value) -> str | None:
    """The name of the activation pattern that ends at ``node`` and is applied to ``x``, if one is."""
    for name, patterns in ACTIVATION_PATTERNS.items():
        for p in patterns:
            match = p.match(model, model.graph, node, check_nodes_are_removable=False)
            if match and match.bindings.get("x") is x:
                return name
    return None


# --------------------------------------------------------------------------- the finder


def find_ffn_blocks(model: ir.Model, linears: list[Linear], by_output: dict[str, Linear]) -> list[FFNBlock]:
    """Linears whose input is an element-wise activation of one (or, gated, two) other linears."""
    values = values_by_name(model.graph)
    blocks = []
    for down in linears:
        start = values.get(down.input)
        if start is None:
            continue
        block = _ffn_ending_at(model, down, start, by_output)
        if block is not None:
            blocks.append(block)
    for i, block in enumerate(blocks):
        block.layer = i
    return blocks


def _elementwise_inputs(node: ir.Node) -> Iterable[ir.Value] | None:
    if elementwise_op(node) is None:
        return None
    return [v for v in node.inputs if v is not None and constant(v) is None]


def _ffn_ending_at(model: ir.Model, down: Linear, start: ir.Value, by_output: dict[str, Linear]) -> FFNBlock | None:
    # The region between the linears has any length and shape (plain, gated, decomposed
    # activations), which no fixed rewriter pattern describes: it is walked by hand.
    found = walk(start, _elementwise_inputs, lambda v: v.name in by_output, max_nodes=40)
    if found is None:
        return None
    ends, region = found
    sources = {v.name: v for v in ends}
    if not region or not any(n.op_type in NONLINEAR_OPS for n in region):
        return None
    if len(sources) == 1:
        (value,) = sources.values()
        up = by_output[value.name]
        if up.out_features != down.in_features:
            return None
        act = _activation_name(model, region, value)
        return FFNBlock(up=up, gate=None, down=down, activation=act, hidden=up.out_features, gated=False)
    if len(sources) == 2:
        return _gated_ffn(model, down, region, list(sources.values()), by_output)
    return None


def _gated_ffn(model, down, region, sources, by_output) -> FFNBlock | None:
    """act(gate) * up: the gate is the source that feeds a nonlinear op inside the region."""
    lins = [by_output[v.name] for v in sources]
    if lins[0].input != lins[1].input or not (lins[0].out_features == lins[1].out_features == down.in_features):
        return None
    in_region = set(region)

    def feeds_nonlinear(value: ir.Value) -> bool:
        return any(n in in_region and n.op_type in NONLINEAR_OPS for n in consumers(value))

    gating = [feeds_nonlinear(v) for v in sources]
    if gating.count(True) != 1:
        return None
    g = gating.index(True)
    gate, up = lins[g], lins[1 - g]
    act = _activation_name(model, region, sources[g])
    return FFNBlock(up=up, gate=gate, down=down, activation=act, hidden=up.out_features, gated=True)


def _activation_name(model: ir.Model, region: list[ir.Node], x: ir.Value) -> str:
    """Name the activation applied to ``x``: a rewriter pattern when one matches, else its op types."""
    for node in region:
        name = match_activation(model, node, x)
        if name is not None:
            return name
    ops = [n.op_type for n in region if n.op_type in NONLINEAR_OPS]
    for op in ops:
        if ELEMENTWISE_OPS[op].activation and op not in _PARTIAL_ACTIVATIONS:
            return activation_name(op)
    if "Erf" in ops:
        return "gelu_erf"
    return activation_name(ops[0]) if ops else "unknown"
