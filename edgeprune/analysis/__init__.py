"""Find the structures later passes act on: linears, FFN and attention blocks, convs, embeddings, MoE.

``analyze(model)`` reads an ``ir.Model`` and never changes it.  Each structure kind has one
finder function that walks producers and consumers on the main graph:

- Linear: ``MatMul(x, W)`` with a constant 2-D ``W`` ([in, out]), ``MatMul(x, Transpose(W))``
  and ``Gemm`` (``transB=1`` means ``W`` is [out, in]); an optional bias is Gemm's ``C`` or an
  ``Add`` consumer with a constant 1-D operand of size ``out``.
- FFNBlock: up linear -> element-wise activation region -> down linear, or, gated (SwiGLU,
  GeGLU), ``act(gate(x)) * up(x) -> down``.  The activation is named with onnxscript rewriter
  patterns (erf-GELU, tanh-GELU, SiLU, quick-GELU) and otherwise by its op types.
- AttentionBlock: ``Softmax`` between a score ``MatMul(Q, K^T)`` and a context ``MatMul(P, V)``;
  Q, K and V are traced back through head-split/rotary/GQA-repeat ops to their linears and the
  context forward through head-merge ops to the output linear.  Head counts come from the
  constant pieces of the head-split ``Reshape`` shape, cross-checked with the linears' widths;
  contrib ``Attention``/``MultiHeadAttention``/``GroupQueryAttention`` read ``num_heads``.
- ConvLayer/ConvChain: ``Conv`` with a constant weight, its following BN/activation, and the
  chains of convs joined only by element-wise/BN/activation ops.
- Embedding: ``Gather`` (axis 0) on a constant 2-D table; tied when the table (or its
  ``Transpose``) is also a MatMul weight (the LM head).
- MoELayer: best effort, a router linear followed (via Softmax) by ``TopK``, or the contrib
  ``MoE`` op; exported MoE graphs often hide experts in loops, so experts may be empty.

Only the main graph is analysed; structures inside subgraphs and functions are not reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Iterable

import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgeprune.analysis.graph import (
    MS_DOMAIN,
    STD_DOMAINS,
    attr,
    const_shape,
    constant,
    consumers,
    is_std,
    node_index,
    node_name,
    static_ints,
    value_name,
    walk,
)

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Linear:
    """A matrix multiply by a constant weight: the unit of FFN/head pruning and of quantization."""

    node: str
    weight: str
    in_features: int
    out_features: int
    bias: str | None
    transposed: bool  # weight stored [out, in] (Gemm transB, or MatMul on Transpose(W))
    input: str
    output: str  # after the bias Add when there is one
    shared: bool  # the weight initializer is used by more than one node
    op_type: str = "MatMul"
    bias_node: str | None = None  # the Add that applies the bias, if separate
    weight_transpose: str | None = None  # the Transpose node between W and the MatMul

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


@dataclasses.dataclass
class AttentionBlock:
    """Self-attention with its projections; heads are the prunable unit (query heads by default)."""

    q: Linear | None
    k: Linear | None
    v: Linear | None
    o: Linear | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    softmax: str | None
    rotary: bool
    layer: int = -1
    op_type: str = "subgraph"  # or the contrib op: Attention, MultiHeadAttention, GroupQueryAttention
    node: str | None = None  # the contrib op node, when there is one
    packed_qkv: Linear | None = None  # contrib Attention's packed [hidden, 3*hidden] weight
    score_matmul: str | None = None
    context_matmul: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ConvLayer:
    """A Conv with a constant weight; output channels are the prunable unit."""

    node: str
    weight: str
    bias: str | None
    out_channels: int
    in_channels: int
    groups: int
    kernel: tuple[int, ...]
    depthwise: bool
    input: str
    output: str  # after BN and activation when they follow
    batchnorm: str | None = None
    activation: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernel"] = list(self.kernel)
        return d


@dataclasses.dataclass
class ConvChain:
    """Convs joined only through element-wise/BN/activation ops: their channels are coupled."""

    convs: list[str]

    def to_dict(self) -> dict:
        return {"convs": list(self.convs)}


@dataclasses.dataclass
class Embedding:
    """A Gather on a constant [vocab, dim] table; ``tied`` when it is also the LM head weight."""

    node: str
    table: str
    vocab: int
    dim: int
    input: str
    tied: bool
    tied_with: str | None = None  # the MatMul/Gemm node that reuses the table

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MoELayer:
    """A router to ``num_experts`` with top-k selection; ``experts`` are found FFNs, maybe none."""

    router: Linear | None
    num_experts: int
    top_k: int | None
    experts: list[FFNBlock]
    node: str | None = None  # the contrib MoE op or the TopK node

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Structures:
    """Everything ``analyze`` found, in graph order."""

    linears: list[Linear] = dataclasses.field(default_factory=list)
    ffn_blocks: list[FFNBlock] = dataclasses.field(default_factory=list)
    attention_blocks: list[AttentionBlock] = dataclasses.field(default_factory=list)
    conv_layers: list[ConvLayer] = dataclasses.field(default_factory=list)
    conv_chains: list[ConvChain] = dataclasses.field(default_factory=list)
    embeddings: list[Embedding] = dataclasses.field(default_factory=list)
    moe_layers: list[MoELayer] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "linears": [x.to_dict() for x in self.linears],
            "ffn_blocks": [x.to_dict() for x in self.ffn_blocks],
            "attention_blocks": [x.to_dict() for x in self.attention_blocks],
            "conv_layers": [x.to_dict() for x in self.conv_layers],
            "conv_chains": [x.to_dict() for x in self.conv_chains],
            "embeddings": [x.to_dict() for x in self.embeddings],
            "moe_layers": [x.to_dict() for x in self.moe_layers],
        }

    def summary(self) -> list[str]:
        """One human line per structure kind found (groups of equal shape share a line)."""
        lines = [f"{len(self.linears)} linear layers ({sum(x.shared for x in self.linears)} with shared weights)"]
        groups = Counter(
            (b.num_heads, b.num_kv_heads, b.head_dim, b.rotary, b.op_type) for b in self.attention_blocks
        )
        for (h, kv, d, rot, op), n in groups.items():
            via = "" if op == "subgraph" else f" ({op} op)"
            rope = ", rotary" if rot else ""
            lines.append(
                f"{n} attention block{_s(n)}{via}: {_q(h)} query heads, {_q(kv)} KV heads, head dim {_q(d)}{rope}"
            )
        ffn = Counter((b.hidden, b.gated, b.activation) for b in self.ffn_blocks)
        for (hidden, gated, act), n in ffn.items():
            kind = "gated" if gated else "not gated"
            lines.append(f"{n} FFN block{_s(n)}: width {hidden}, {kind}, activation {act}")
        if self.conv_layers:
            dw = sum(c.depthwise for c in self.conv_layers)
            lines.append(
                f"{len(self.conv_layers)} conv layers ({dw} depthwise) in {len(self.conv_chains)} chain{_s(len(self.conv_chains))}"
            )
        for e in self.embeddings:
            tied = f", tied with {e.tied_with}" if e.tied else ""
            lines.append(f"embedding {e.table}: vocab {e.vocab}, dim {e.dim}{tied}")
        if self.moe_layers:
            m = self.moe_layers[0]
            lines.append(
                f"{len(self.moe_layers)} MoE layer{_s(len(self.moe_layers))}: {m.num_experts} experts, top-{_q(m.top_k)}"
            )
        else:
            lines.append("no MoE layers")
        return lines


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _q(x) -> str:
    return "?" if x is None else str(x)


# --------------------------------------------------------------------------- entry point


def analyze(model: ir.Model) -> Structures:
    """Find linears, FFN/attention blocks, convs, embeddings and MoE routers in ``model`` (read-only)."""
    graph = model.graph
    linears = find_linears(graph)
    by_output = {lin.output: lin for lin in linears}
    ffns = find_ffn_blocks(model, linears, by_output)
    attention = find_attention_blocks(graph, linears, by_output)
    convs = find_conv_layers(graph)
    structures = Structures(
        linears=linears,
        ffn_blocks=ffns,
        attention_blocks=attention,
        conv_layers=convs,
        conv_chains=find_conv_chains(convs, graph),
        embeddings=find_embeddings(graph, linears),
        moe_layers=find_moe_layers(graph, linears, ffns),
    )
    for line in structures.summary():
        logger.info("analysis: %s", line)
    return structures


# --------------------------------------------------------------------------- linears


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every MatMul/Gemm by a constant 2-D weight, with its bias when it has one."""
    found = []
    for node in graph:
        lin = None
        if is_std(node, "MatMul"):
            lin = _matmul_linear(node)
        elif is_std(node, "Gemm"):
            lin = _gemm_linear(node)
        if lin is not None:
            found.append(lin)
    return found


def _weight_users(weight: ir.Value) -> int:
    return len(consumers(weight))


def _matmul_linear(node: ir.Node) -> Linear | None:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or constant(x) is not None:
        return None
    transposed, transpose_node = False, None
    shape = const_shape(w)
    if shape is None and w is not None and w.producer() is not None and is_std(w.producer(), "Transpose"):
        tnode = w.producer()
        perm = attr(tnode, "perm")
        src_shape = const_shape(tnode.inputs[0])
        if src_shape is not None and len(src_shape) == 2 and perm in (None, (1, 0), [1, 0]):
            transposed, transpose_node, w = True, tnode, tnode.inputs[0]
            shape = src_shape
    if shape is None or len(shape) != 2:
        return None
    in_f, out_f = (shape[1], shape[0]) if transposed else shape
    bias, bias_node, output = _bias_add(node.outputs[0], out_f)
    return Linear(
        node=node_name(node),
        weight=w.name or "",
        in_features=in_f,
        out_features=out_f,
        bias=bias,
        transposed=transposed,
        input=x.name or "",
        output=output,
        shared=_weight_users(w) > 1,
        op_type="MatMul",
        bias_node=bias_node,
        weight_transpose=None if transpose_node is None else node_name(transpose_node),
    )


def _gemm_linear(node: ir.Node) -> Linear | None:
    x, w = node.inputs[0], node.inputs[1]
    shape = const_shape(w)
    if x is None or shape is None or len(shape) != 2 or attr(node, "transA", 0):
        return None
    transposed = bool(attr(node, "transB", 0))
    in_f, out_f = (shape[1], shape[0]) if transposed else shape
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = c.name if c is not None and constant(c) is not None else None
    output = node.outputs[0]
    bias_node = None
    if bias is None:
        bias, bias_node, out_name = _bias_add(output, out_f)
    else:
        out_name = output.name or ""
    return Linear(
        node=node_name(node),
        weight=w.name or "",
        in_features=in_f,
        out_features=out_f,
        bias=bias,
        transposed=transposed,
        input=x.name or "",
        output=out_name,
        shared=_weight_users(w) > 1,
        op_type="Gemm",
        bias_node=bias_node,
    )


def _bias_add(out: ir.Value, out_features: int) -> tuple[str | None, str | None, str]:
    """(bias name, Add node name, value after bias) when ``out``'s only consumer adds a 1-D constant."""
    users = consumers(out)
    if len(users) == 1 and is_std(users[0], "Add") and not out.is_graph_output():
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        shape = const_shape(other)
        if shape is not None and len(shape) == 1 and shape[0] == out_features:
            return other.name, node_name(add), add.outputs[0].name or ""
    return None, None, out.name or ""


# --------------------------------------------------------------------------- FFN blocks

_LINEAR_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity"}
_NONLINEAR_OPS = {
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
    "Silu", "Swish", "HardSigmoid", "HardSwish", "Clip", "Softplus", "Mish", "Elu", "Selu",
    "Celu", "Exp", "Pow", "Sqrt", "Abs", "PRelu", "Softsign", "Min", "Max", "ThresholdedRelu",
}  # fmt: skip
_ACTIVATION_NAMES = {
    "Gelu": "gelu", "FastGelu": "gelu_tanh", "BiasGelu": "gelu", "QuickGelu": "quick_gelu",
    "Relu": "relu", "LeakyRelu": "leaky_relu", "Silu": "silu", "Swish": "silu",
    "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Clip": "clip", "Elu": "elu",
    "Selu": "selu", "Celu": "celu", "Softplus": "softplus", "Mish": "mish", "PRelu": "prelu",
    "Tanh": "tanh", "Sigmoid": "sigmoid",
}  # fmt: skip


# Activation patterns for matching only.  Constants are pattern variables checked by value in
# the condition, because exported graphs keep scalars in Constant nodes, which the rewriter's
# literal constants do not look through (and analysis must not lift them in the caller's model).
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


def _constants_match(context, **bindings) -> bool:
    """Every bound ``c_*`` variable is a scalar constant close to its expected value."""
    for name, value in bindings.items():
        if not name.startswith("c_"):
            continue
        tensor = constant(value)
        if tensor is None or tensor.size != 1:
            return False
        if not math.isclose(float(tensor.numpy().reshape(-1)[0]), _EXPECTED_CONSTANTS[name], rel_tol=1e-3):
            return False
    return True


def _identity(op, x, **_):  # the replacement is never applied: these rules only match
    return op.Identity(x)


def _match_rules(*fns) -> list[pattern.RewriteRule]:
    """All commuted variants of the patterns (Mul/Add operand order varies between exporters)."""
    return [rule for fn in fns for rule in pattern.RewriteRule(fn, _identity, _constants_match).commute()]


_ACTIVATION_PATTERNS: list[tuple[str, list[pattern.RewriteRule]]] = [
    ("gelu_erf", _match_rules(_erf_gelu, _erf_gelu_half_inside, _erf_gelu_inv_sqrt2)),
    ("gelu_tanh", _match_rules(_tanh_gelu)),
    ("quick_gelu", _match_rules(_quick_gelu)),
    ("silu", _match_rules(_silu)),
]


def find_ffn_blocks(model: ir.Model, linears: list[Linear], by_output: dict[str, Linear]) -> list[FFNBlock]:
    """Linears whose input is an element-wise activation of one (or, gated, two) other linears."""
    graph = model.graph
    values = _values_by_name(graph)
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


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def _elementwise_inputs(node: ir.Node) -> Iterable[ir.Value] | None:
    if node.domain not in STD_DOMAINS + (MS_DOMAIN,):
        return None
    if node.op_type in _LINEAR_OPS or node.op_type in _NONLINEAR_OPS:
        return [v for v in node.inputs if v is not None and constant(v) is None]
    return None


def _ffn_ending_at(model: ir.Model, down: Linear, start: ir.Value, by_output: dict[str, Linear]) -> FFNBlock | None:
    found = walk(start, _elementwise_inputs, lambda v: v.name in by_output, max_nodes=40)
    if found is None:
        return None
    ends, region = found
    sources = {v.name: v for v in ends}
    if not region or not any(n.op_type in _NONLINEAR_OPS for n in region):
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
    in_region = {id(n) for n in region}

    def feeds_nonlinear(value: ir.Value) -> bool:
        return any(id(n) in in_region and n.op_type in _NONLINEAR_OPS for n in consumers(value))

    gating = [feeds_nonlinear(v) for v in sources]
    if gating.count(True) != 1:
        return None
    g = gating.index(True)
    gate, up = lins[g], lins[1 - g]
    act = _activation_name(model, region, sources[g])
    return FFNBlock(up=up, gate=gate, down=down, activation=act, hidden=up.out_features, gated=True)


def _activation_name(model: ir.Model, region: list[ir.Node], x: ir.Value) -> str:
    """Name the activation applied to ``x``: a rewriter pattern when one matches, else its op type."""
    for node in region:
        for name, rules in _ACTIVATION_PATTERNS:
            for rule in rules:
                match = rule.match(model, model.graph, node, check_nodes_are_removable=False)
                if match and match.bindings.get("x") is x:
                    return name
    ops = [n.op_type for n in region if n.op_type in _NONLINEAR_OPS]
    for op in ops:
        if op in _ACTIVATION_NAMES and op not in ("Tanh", "Sigmoid"):
            return _ACTIVATION_NAMES[op]
    if "Erf" in ops:
        return "gelu_erf"
    return _ACTIVATION_NAMES.get(ops[0], ops[0].lower()) if ops else "unknown"


# --------------------------------------------------------------------------- attention blocks

# Ops Q/K/V pass through between their linear and the score/context MatMul: head split and
# merge, scaling, rotary embedding (rotate_half: Slice/Neg/Concat, Mul/Add with cos/sin), GQA
# repeat (Unsqueeze/Expand/Reshape).  Only the data input of shape-taking ops is followed.
_DATA_INPUT_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice", "Split", "Tile", "Flatten"}
_PATH_OPS = _DATA_INPUT_ONLY | {"Transpose", "Mul", "Div", "Add", "Sub", "Neg", "Concat", "Cast", "Identity"}
_SCORE_TO_SOFTMAX_OPS = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Tanh"}
_SOFTMAX_TO_CONTEXT_OPS = {"Where", "Cast", "Identity", "Dropout", "Mul", "Div"}
_MERGE_OPS = {"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Flatten"}
_NATIVE_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def find_attention_blocks(graph: ir.Graph, linears: list[Linear], by_output: dict[str, Linear]) -> list[AttentionBlock]:
    """Softmax-centred attention subgraphs plus contrib attention ops, numbered in graph order."""
    order = node_index(graph)
    found: list[tuple[int, AttentionBlock]] = []
    for node in graph:
        if is_std(node, "Softmax"):
            block = _attention_at_softmax(node, by_output)
        elif node.domain == MS_DOMAIN and node.op_type in _NATIVE_ATTENTION:
            block = _native_attention(node, by_output)
        else:
            continue
        if block is not None:
            found.append((order[id(node)], block))
    found.sort(key=lambda item: item[0])
    blocks = [b for _, b in found]
    for i, block in enumerate(blocks):
        block.layer = i
    return blocks


def _is_activation_matmul(node: ir.Node | None) -> bool:
    """A MatMul of two computed tensors (scores or context), not a linear."""
    return (
        node is not None
        and is_std(node, "MatMul")
        and all(v is not None and constant(v) is None for v in node.inputs)
        and not (node.inputs[1].producer() is not None and is_std(node.inputs[1].producer(), "Transpose")
                 and constant(node.inputs[1].producer().inputs[0]) is not None)
    )  # fmt: skip


def _score_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk back from Softmax over mask/scale ops to the MatMul(Q, K^T)."""
    frontier, seen = [softmax.inputs[0]], 0
    while frontier and seen < 16:
        value = frontier.pop(0)
        seen += 1
        node = value.producer() if value is not None else None
        if node is None:
            continue
        if _is_activation_matmul(node):
            return node
        if is_std(node, *_SCORE_TO_SOFTMAX_OPS):
            frontier.extend(v for v in node.inputs if v is not None and constant(v) is None)
    return None


def _context_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk forward from Softmax over NaN-guard/dropout ops to the MatMul(P, V)."""
    frontier, seen = [softmax.outputs[0]], 0
    while frontier and seen < 16:
        value = frontier.pop(0)
        seen += 1
        for node in consumers(value):
            if _is_activation_matmul(node) and node.inputs[0] is value:
                return node
            if is_std(node, *_SOFTMAX_TO_CONTEXT_OPS):
                frontier.extend(node.outputs)
    return None


def _path_inputs(node: ir.Node) -> Iterable[ir.Value] | None:
    if node.domain in STD_DOMAINS and node.op_type in _PATH_OPS:
        inputs = node.inputs[:1] if node.op_type in _DATA_INPUT_ONLY else node.inputs
        return [v for v in inputs if v is not None and constant(v) is None]
    if node.domain == MS_DOMAIN and node.op_type == "RotaryEmbedding":
        return node.inputs[:1]
    return []  # any other op (Sin/Cos, Shape, ...) ends this branch without a linear


def _trace_to_linear(value: ir.Value, by_output: dict[str, Linear]) -> tuple[Linear, list[ir.Node]] | None:
    """The single linear that ``value`` is computed from through head-split/rotary/repeat ops."""
    found = walk(value, _path_inputs, lambda v: v.name in by_output, max_nodes=80, graph_inputs_end=True)
    if found is None:
        return None
    ends, nodes = found
    names = {v.name for v in ends}
    if len(names) != 1:
        return None
    return by_output[names.pop()], nodes


def _output_linear(value: ir.Value, linears_by_input: dict[str, list[Linear]]) -> Linear | None:
    """The linear that reads the merged heads (through Transpose/Reshape)."""
    for _ in range(8):
        lins = linears_by_input.get(value.name or "")
        if lins and len(lins) == 1:
            return lins[0]
        users = [n for n in consumers(value) if not is_std(n, "Shape")]
        if len(users) != 1 or not is_std(users[0], *_MERGE_OPS):
            return None
        value = users[0].outputs[0]
    return None


def _attention_at_softmax(softmax: ir.Node, by_output: dict[str, Linear]) -> AttentionBlock | None:
    score, context = _score_matmul(softmax), _context_matmul(softmax)
    if score is None or context is None:
        return None
    q_trace = _trace_to_linear(score.inputs[0], by_output)
    k_trace = _trace_to_linear(score.inputs[1], by_output)
    v_trace = _trace_to_linear(context.inputs[1], by_output)
    if q_trace is None or k_trace is None or v_trace is None:
        logger.debug("softmax %s: q/k/v do not trace back to linears", softmax.name)
        return None
    (q, q_nodes), (k, k_nodes), (v, _) = q_trace, k_trace, v_trace
    if len({q.output, k.output, v.output}) != 3 or k.input != v.input:
        logger.debug("softmax %s: fused or cross q/k/v projections are not handled", softmax.name)
        return None
    linears_by_input: dict[str, list[Linear]] = {}
    for lin in by_output.values():
        linears_by_input.setdefault(lin.input, []).append(lin)
    o = _output_linear(context.outputs[0], linears_by_input)
    heads, head_dim = _head_split(q, q_nodes)
    kv_heads, kv_dim = _head_split(k, k_nodes)
    heads, kv_heads, head_dim = _reconcile_heads(softmax.name, q, k, heads, head_dim, kv_heads, kv_dim)
    rotary = _has_rotary(q_nodes) and _has_rotary(k_nodes)
    return AttentionBlock(
        q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        softmax=node_name(softmax), rotary=rotary, score_matmul=node_name(score), context_matmul=node_name(context),
    )  # fmt: skip


def _has_rotary(nodes: list[ir.Node]) -> bool:
    """rotate_half (Neg of a half, Concat) or a RotaryEmbedding op on the path."""
    ops = {n.op_type for n in nodes}
    return "RotaryEmbedding" in ops or ("Neg" in ops and "Concat" in ops)


def _head_split(lin: Linear, path: list[ir.Node]) -> tuple[int | None, int | None]:
    """(heads, head_dim) from the constant pieces of the Reshape right after ``lin``."""
    for node in path:
        if not is_std(node, "Reshape"):
            continue
        src = node.inputs[0]
        while src is not None and src.name != lin.output and src.producer() is not None and is_std(src.producer(), "Cast", "Identity"):
            src = src.producer().inputs[0]
        if src is None or src.name != lin.output:
            continue
        shape = static_ints(node.inputs[1])
        if shape is None or len(shape) < 2:
            out_shape = node.outputs[0].shape
            shape = None if out_shape is None else [d if isinstance(d, int) else None for d in out_shape]
        if shape is None or len(shape) < 2:
            return None, None
        h, d = shape[-2], shape[-1]
        h = h if h is not None and h > 0 else None
        d = d if d is not None and d > 0 else None
        return h, d
    return None, None


def _reconcile_heads(name, q, k, heads, head_dim, kv_heads, kv_dim):
    """Fill the unknowns from out_features = heads * head_dim and check the knowns agree."""
    head_dim = head_dim or kv_dim
    if head_dim is None and heads:
        head_dim = q.out_features // heads
    if head_dim is None and kv_heads:
        head_dim = k.out_features // kv_heads
    if head_dim:
        heads = heads or q.out_features // head_dim
        kv_heads = kv_heads or k.out_features // head_dim
    if heads and head_dim and heads * head_dim != q.out_features:
        logger.warning("%s: %d heads x %d != q width %d", name, heads, head_dim, q.out_features)
    if kv_heads and head_dim and kv_heads * head_dim != k.out_features:
        logger.warning("%s: %d KV heads x %d != k width %d", name, kv_heads, head_dim, k.out_features)
    if heads is None:
        logger.warning("%s: could not read the head count from the graph", name)
    return heads, kv_heads, head_dim


def _native_attention(node: ir.Node, by_output: dict[str, Linear]) -> AttentionBlock | None:
    """Contrib attention ops carry num_heads (and kv_num_heads) as attributes."""
    heads = attr(node, "num_heads")
    kv_heads = attr(node, "kv_num_heads", heads)
    linears_by_input: dict[str, list[Linear]] = {}
    for lin in by_output.values():
        linears_by_input.setdefault(lin.input, []).append(lin)
    o = _output_linear(node.outputs[0], linears_by_input)
    packed, q = None, None
    if node.op_type == "Attention":
        shape = const_shape(node.inputs[1])
        if shape is None or len(shape) != 2:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        packed = Linear(
            node=node_name(node), weight=node.inputs[1].name or "", in_features=shape[0],
            out_features=shape[1], bias=value_name(bias), transposed=False, input=value_name(node.inputs[0]) or "",
            output=node.outputs[0].name or "", shared=_weight_users(node.inputs[1]) > 1, op_type="Attention",
        )  # fmt: skip
        width = shape[1] // 3
        k = v = None
    else:
        traced = [_trace_to_linear(v, by_output) if v is not None else None for v in node.inputs[:3]]
        q, k, v = (t[0] if t else None for t in traced)
        width = q.out_features if q else None
    head_dim = width // heads if width and heads else None
    return AttentionBlock(
        q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, softmax=None,
        rotary=bool(attr(node, "do_rotary", 0)), op_type=node.op_type, node=node_name(node), packed_qkv=packed,
    )  # fmt: skip


# --------------------------------------------------------------------------- convolutions

_CONV_FOLLOW_ACTS = {"Relu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Tanh", "Elu", "Selu", "PRelu"}
_CHAIN_OPS = {"BatchNormalization", "Add", "Sub", "Mul", "Div", "Cast", "Identity"} | _CONV_FOLLOW_ACTS | _NONLINEAR_OPS


def find_conv_layers(graph: ir.Graph) -> list[ConvLayer]:
    """Conv nodes with constant weights, with the BatchNormalization/activation right after them."""
    layers = []
    for node in graph:
        if not is_std(node, "Conv"):
            continue
        shape = const_shape(node.inputs[1])
        if shape is None or len(shape) < 3 or node.inputs[0] is None:
            continue
        groups = int(attr(node, "group", 1))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        out = node.outputs[0]
        bn, act = None, None
        users = consumers(out)
        if len(users) == 1 and is_std(users[0], "BatchNormalization"):
            bn, out = node_name(users[0]), users[0].outputs[0]
            users = consumers(out)
        if len(users) == 1 and is_std(users[0], *_CONV_FOLLOW_ACTS):
            act_node = users[0]
            act = _swish_or(act_node, out)
            out = _swish_output(act_node, out)
        elif len(users) == 2 and _swish_output(None, out) is not None:
            act, out = "silu", _swish_output(None, out)
        layers.append(
            ConvLayer(
                node=node_name(node), weight=node.inputs[1].name or "", bias=value_name(bias) if constant(bias) is not None else None,
                out_channels=shape[0], in_channels=shape[1] * groups, groups=groups, kernel=tuple(shape[2:]),
                depthwise=groups > 1 and shape[1] == 1, input=node.inputs[0].name or "", output=out.name or "",
                batchnorm=bn, activation=act,
            )
        )  # fmt: skip
    return layers


def _swish_output(act_node: ir.Node | None, x: ir.Value) -> ir.Value | None:
    """For x * Sigmoid(x) the Mul's output; otherwise the activation's own output."""
    sig = act_node
    if sig is None:
        sigs = [n for n in consumers(x) if is_std(n, "Sigmoid")]
        if not sigs:
            return None
        sig = sigs[0]
    if is_std(sig, "Sigmoid"):
        for mul in consumers(sig.outputs[0]):
            if is_std(mul, "Mul") and x in mul.inputs:
                return mul.outputs[0]
        if act_node is None:
            return None
    return sig.outputs[0]


def _swish_or(act_node: ir.Node, x: ir.Value) -> str:
    if is_std(act_node, "Sigmoid") and _swish_output(act_node, x) is not act_node.outputs[0]:
        return "silu"
    return _ACTIVATION_NAMES.get(act_node.op_type, act_node.op_type.lower())


def find_conv_chains(convs: list[ConvLayer], graph: ir.Graph) -> list[ConvChain]:
    """Group convs reachable from one another through element-wise/BN/activation ops only."""
    by_input: dict[str, list[str]] = {}
    for c in convs:
        by_input.setdefault(c.input, []).append(c.node)
    values = _values_by_name(graph)
    parent = {c.node: c.node for c in convs}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in convs:
        start = values.get(c.output)
        frontier, seen = [start] if start is not None else [], set()
        while frontier:
            value = frontier.pop()
            if id(value) in seen or len(seen) > 64:
                continue
            seen.add(id(value))
            for nxt in by_input.get(value.name or "", []):
                parent[root(nxt)] = root(c.node)
            for user in consumers(value):
                if user.domain in STD_DOMAINS and user.op_type in _CHAIN_OPS:
                    frontier.extend(user.outputs)
    chains: dict[str, list[str]] = {}
    for c in convs:
        chains.setdefault(root(c.node), []).append(c.node)
    return [ConvChain(convs=names) for names in chains.values()]


# --------------------------------------------------------------------------- embeddings


def find_embeddings(graph: ir.Graph, linears: list[Linear]) -> list[Embedding]:
    """Gathers (axis 0) on constant 2-D float tables by integer indices; tied if a linear reuses the table."""
    head_by_weight = {lin.weight: lin.node for lin in linears}
    found = []
    for node in graph:
        if not is_std(node, "Gather") or attr(node, "axis", 0) != 0:
            continue
        table, idx = node.inputs[0], node.inputs[1]
        tensor = constant(table)
        if tensor is None or len(tensor.shape) != 2 or idx is None:
            continue
        if tensor.dtype is not None and not tensor.dtype.is_floating_point():
            continue
        if idx.dtype is not None and idx.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            continue
        head = head_by_weight.get(table.name or "")
        found.append(
            Embedding(
                node=node_name(node), table=table.name or "", vocab=int(tensor.shape[0]), dim=int(tensor.shape[1]),
                input=idx.name or "", tied=head is not None, tied_with=head,
            )
        )  # fmt: skip
    return found


# --------------------------------------------------------------------------- MoE


def find_moe_layers(graph: ir.Graph, linears: list[Linear], ffns: list[FFNBlock]) -> list[MoELayer]:
    """Best effort: a router linear whose output (maybe via Softmax) feeds TopK, or a contrib MoE op."""
    by_output = {lin.output: lin for lin in linears}
    values = _values_by_name(graph)
    layers = []
    for node in graph:
        if node.domain == MS_DOMAIN and node.op_type in ("MoE", "QMoE"):
            router = by_output.get(value_name(node.inputs[1]) or "")
            n = router.out_features if router else None
            layers.append(MoELayer(router=router, num_experts=n or 0, top_k=attr(node, "k"), experts=[], node=node_name(node)))
    for lin in linears:
        topk = _topk_after(values.get(lin.output))
        if topk is None:
            continue
        k_tensor = constant(topk.inputs[1]) if len(topk.inputs) > 1 else None
        k = int(k_tensor.numpy().reshape(-1)[0]) if k_tensor is not None else None
        experts = [f for f in ffns if (f.gate or f.up).input == lin.input]
        layers.append(MoELayer(router=lin, num_experts=lin.out_features, top_k=k, experts=experts, node=node_name(topk)))
    return layers


def _topk_after(value: ir.Value | None) -> ir.Node | None:
    if value is None:
        return None
    for user in consumers(value):
        if is_std(user, "TopK"):
            return user
        if is_std(user, "Softmax", "Sigmoid", "Cast"):
            for nxt in consumers(user.outputs[0]):
                if is_std(nxt, "TopK"):
                    return nxt
    return None
