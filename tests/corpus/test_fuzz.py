"""Fuzzing compile with random small valid graphs (hypothesis, derandomized: the same 25 graphs every run;
45-75 s on 2 shared cores, three compiles per graph).

A graph (opset 13, 17 or 21) is a chain over one tensor, either a feature map ``[N, c, 4, 4]`` or features ``[N, d]``:
Conv (grouped or depthwise, random group count), Relu, Add of a constant, Transpose (H<->W), Concat of
the tensor with its Relu on channels, GlobalAveragePool + Flatten or Reshape ``[0, -1]`` to features;
MatMul with a constant weight, Gemm (transB either way), Gelu written with Erf, Softmax, Concat on features,
Reshape + Transpose + Reshape (a channel shuffle). Each graph is checked twice:

(a) the no-op settings -- ``--prune 0`` and a cleanup-only recipe -- give outputs equal to the input's
    bit for bit (np.array_equal, both run by ORT with its default optimizations): cleanup folds only
    constant subgraphs, and these graphs have none beyond their initializers, so nothing is recomputed;
(b) one random option combination never exits 3: it ends verified (exit 0) or refused (exit 1/2) with
    one ``error:`` sentence, stderr's last line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeprune.cli import main

OPTION_SETS = [
    ["--bits", "8"],
    ["--bits", "4"],
    ["--prune", "0.1"],
    ["--prune", "0.5", "--prune-metric", "magnitude"],
    ["--prune", "0.3", "--allocation", "uniform", "--round-to", "1"],
    ["--prune", "0.2", "--refit"],
    ["--bits", "auto", "--avg-bits", "6"],
    ["--bits", "auto", "--size-budget", "2KB"],
    ["--bits", "auto", "--latency-budget", "0.9x"],
    ["--prune", "0.2", "--bits", "8"],
    ["--max-drop", "0.001"],
    [],
]

IMAGE_OPS = ["conv", "relu", "add", "transpose", "concat", "to_features"]
FEATURE_OPS = ["matmul", "gemm", "relu", "add", "gelu", "softmax", "concat", "shuffle"]


def build(
    steps, seed: int, image: bool, width: int, opset: int = 17
) -> onnx.ModelProto:
    """The ONNX model of ``steps`` over an input ``x`` ([N, width, 4, 4] when ``image``, else [N, width])."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    state = {"name": "x", "image": image, "width": width, "n": 0}

    def fresh(prefix):
        state["n"] += 1
        return f"{prefix}{state['n']}"

    def const(prefix, array):
        name = fresh(prefix)
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, **attrs):
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        state["name"] = out
        return out

    shape = [1, width, 4, 4] if image else [1, width]
    for op, p in steps:
        x, c = state["name"], state["width"]
        if op == "conv":
            k = p["k"]
            w = (
                rng.standard_normal((p["out"], c // p["groups"], k, k))
                / math.sqrt(c // p["groups"] * k * k)
            ).astype(np.float32)
            b = (0.1 * rng.standard_normal(p["out"])).astype(np.float32)
            node(
                "Conv",
                [x, const("w", w), const("b", b)],
                group=p["groups"],
                pads=[k // 2] * 4,
            )
            state["width"] = p["out"]
        elif op == "relu":
            node("Relu", [x])
        elif op == "add":
            bshape = (c, 1, 1) if state["image"] else (c,)
            node(
                "Add",
                [x, const("c", (0.1 * rng.standard_normal(bshape)).astype(np.float32))],
            )
        elif op == "transpose":
            node("Transpose", [x], perm=[0, 1, 3, 2])
        elif op == "concat":
            r = node("Relu", [x])
            node("Concat", [x, r], axis=1)
            state["width"] = 2 * c
        elif op == "to_features":
            g = node("GlobalAveragePool", [x])
            if p["flatten"]:
                node("Flatten", [g], axis=1)
            else:
                node("Reshape", [g, const("shape", np.asarray([0, -1], np.int64))])
            state["image"] = False
        elif op in ("matmul", "gemm"):
            w = (rng.standard_normal((c, p["out"])) / math.sqrt(c)).astype(np.float32)
            b = (0.1 * rng.standard_normal(p["out"])).astype(np.float32)
            if op == "gemm":
                weight = const("w", np.ascontiguousarray(w.T) if p["transB"] else w)
                node(
                    "Gemm",
                    [x, weight] + ([const("b", b)] if p["bias"] else []),
                    transB=int(p["transB"]),
                )
            else:
                m = node("MatMul", [x, const("w", w)])
                if p["bias"]:
                    node("Add", [m, const("b", b)])
            state["width"] = p["out"]
        elif (
            op == "gelu"
        ):  # 0.5 x (1 + erf(x / sqrt 2)), as exporters write it before opset 20
            d = node("Div", [x, const("s", np.float32(math.sqrt(2)))])
            e = node("Erf", [d])
            a = node("Add", [e, const("one", np.float32(1))])
            m = node("Mul", [x, a])
            node("Mul", [m, const("half", np.float32(0.5))])
        elif op == "softmax":
            node("Softmax", [x], axis=-1)
        elif op == "shuffle":
            r = node(
                "Reshape", [x, const("shape", np.asarray([0, 2, c // 2], np.int64))]
            )
            t = node("Transpose", [r], perm=[0, 2, 1])
            node("Reshape", [t, const("shape", np.asarray([0, c], np.int64))])
    if state["name"] == "x":
        node("Relu", ["x"])
    nodes[-1].output[0] = "y"  # the chain's last node: nothing reads its output
    out_shape = ["N", state["width"], 4, 4] if state["image"] else ["N", state["width"]]
    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=10 if opset >= 21 else 8,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_model(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def _compile(capsys, src, out, *options):
    code = main(["compile", str(src), "-o", str(out), "--max-samples", "8", *options])
    return code, capsys.readouterr().err


@st.composite
def cases(draw):
    image = draw(st.booleans())
    width = draw(st.sampled_from([2, 4, 8]) if image else st.sampled_from([4, 8, 16]))
    steps = draw(_steps(image, width))
    return (
        image,
        width,
        steps,
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(range(len(OPTION_SETS)))),
        draw(st.sampled_from([13, 17, 21])),
    )


@st.composite
def _steps(draw, image, width):
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        if image:
            op = draw(st.sampled_from(IMAGE_OPS))
            if op == "conv":
                out = draw(st.sampled_from([4, 8, 16]))
                groups = draw(
                    st.sampled_from(
                        [g for g in (1, 2, 4, width) if width % g == 0 and out % g == 0]
                    )
                )
                steps.append(
                    (
                        "conv",
                        {
                            "out": out,
                            "groups": groups,
                            "k": draw(st.sampled_from([1, 3])),
                        },
                    )
                )
                width = out
            elif op == "concat" and width <= 16:
                steps.append(("concat", {}))
                width *= 2
            elif op == "to_features":
                steps.append(("to_features", {"flatten": draw(st.booleans())}))
                image = False
            elif op in ("relu", "add", "transpose"):
                steps.append((op, {}))
        else:
            op = draw(st.sampled_from(FEATURE_OPS))
            if op in ("matmul", "gemm"):
                out = draw(st.sampled_from([4, 8, 16, 32]))
                steps.append(
                    (
                        op,
                        {
                            "out": out,
                            "transB": draw(st.booleans()),
                            "bias": draw(st.booleans()),
                        },
                    )
                )
                width = out
            elif op == "concat" and width <= 16:
                steps.append(("concat", {}))
                width *= 2
            elif op in ("relu", "add", "gelu", "softmax", "shuffle"):
                steps.append((op, {}))
    return steps


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(case=cases())
def test_fuzz_compile(case, tmp_path_factory, capsys):
    image, width, steps, seed, option_index, opset = case
    folder = tmp_path_factory.mktemp("fuzz")
    src = folder / "model.onnx"
    onnx.save(build(steps, seed, image, width, opset), str(src))
    before = src.read_bytes()
    x = (
        np.random.default_rng(seed)
        .standard_normal((3, width, 4, 4) if image else (3, width))
        .astype(np.float32)
    )
    reference = _run_model(src, x)

    # (a) the no-op settings reproduce the outputs exactly
    recipe = folder / "cleanup.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n')
    for name, options in (
        ("prune0", ["--prune", "0"]),
        ("cleanup", ["--recipe", str(recipe)]),
    ):
        code, stderr = _compile(capsys, src, folder / name, *options)
        assert code == 0, (steps, name, stderr)
        assert np.array_equal(_run_model(folder / name / "model.onnx", x), reference), (
            steps,
            name,
        )

    # (b) an option combination: verified, or refused with one sentence; never exit 3
    options = OPTION_SETS[option_index]
    out = folder / "opts"
    code, stderr = _compile(capsys, src, out, *options)
    assert src.read_bytes() == before
    errors = [
        line
        for line in stderr.splitlines()
        if line.startswith(("error:", "budget failed:"))
    ]
    assert code in (0, 1, 2) and "Traceback" not in stderr, (steps, options, stderr)
    if code == 0:
        ver = json.loads((out / "report.json").read_text())["verification"]
        assert (
            errors == [] and ver["checker_ok"] and ver["ort_ok"] and ver["budget_ok"]
        ), (steps, options, stderr)
        assert _run_model(out / "model.onnx", x).shape[1:] == reference.shape[1:]
    else:
        assert errors == [stderr.splitlines()[-1]] and errors[0].endswith("."), (
            steps,
            options,
            stderr,
        )
        assert not out.exists()
