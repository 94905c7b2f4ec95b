"""ORT's CPU MatMulNBits with no zero points, uint8 zero points, float zero points, and centred codes plus block
offsets (``edgeprune.passes.bits.offsets``), side by side: why block offsets ride beside the kernel.

    python benchmarks/run_zero_point_kernels.py [--k 576 --n 1536 --block 32 --copies 64]

Each variant is ``copies`` nodes of one 4-bit K x N weight (distinct random codes) reading one input, timed
interleaved (min of 7 rounds, per node) at 1 and 128 tokens and accuracy levels 0 and 4, 2 threads, spinning off.
The offsets variant shares one block-sum MatMul among its copies, as packed siblings share it in a compiled model.
Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeprune.passes.bits.offsets import block_indicator


def model(kind: str, k: int, n: int, block: int, tokens: int, level: int, copies: int, rng):
    kb = k // block
    nodes, inits, outs = [], [], []
    if kind == "offsets":
        inits.append(numpy_helper.from_array(block_indicator(k, block), "E"))
        nodes.append(helper.make_node("MatMul", ["x", "E"], ["sums"]))
    for c in range(copies):
        ins = ["x", f"w{c}", f"s{c}"]
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, kb, block // 2)).astype(np.uint8), f"w{c}"),
                  numpy_helper.from_array((rng.random(n * kb) * 0.01).astype(np.float32), f"s{c}")]
        if kind == "uint8 zero points":
            inits.append(numpy_helper.from_array(rng.integers(0, 256, n * ((kb + 1) // 2)).astype(np.uint8), f"z{c}"))
            ins.append(f"z{c}")
        elif kind == "float zero points":
            inits.append(numpy_helper.from_array((rng.random(n * kb) * 15).astype(np.float32), f"z{c}"))
            ins.append(f"z{c}")
        y = f"m{c}" if kind == "offsets" else f"y{c}"
        nodes.append(helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block, accuracy_level=level))
        if kind == "offsets":
            inits.append(numpy_helper.from_array((rng.random((kb, n)) * 0.01).astype(np.float32), f"o{c}"))
            nodes += [helper.make_node("MatMul", ["sums", f"o{c}"], [f"t{c}"]),
                      helper.make_node("Add", [f"m{c}", f"t{c}"], [f"y{c}"])]
        outs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--copies", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    kinds = ("no zero points", "uint8 zero points", "float zero points", "offsets")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    print(f"ORT {ort.__version__}, 4-bit {args.k}x{args.n} b{args.block}, us per node (min of {args.rounds} rounds)\n")
    print("| tokens | accuracy level | " + " | ".join(kinds) + " |")
    print("|---:|---:|" + "---:|" * len(kinds))
    rng = np.random.default_rng(0)
    for tokens in (1, 128):
        for level in (0, 4):
            sessions = {kd: ort.InferenceSession(model(kd, args.k, args.n, args.block, tokens, level, args.copies, rng)
                                                 .SerializeToString(), so, providers=["CPUExecutionProvider"]) for kd in kinds}
            x = {"x": rng.standard_normal((1, tokens, args.k)).astype(np.float32)}
            times = {kd: [] for kd in kinds}
            for _ in range(args.rounds):
                for kd, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, x)
                    times[kd].append(time.perf_counter() - t)
            print(f"| {tokens} | {level} | " + " | ".join(f"{min(times[kd]) / args.copies * 1e6:.1f}" for kd in kinds) + " |")


if __name__ == "__main__":
    main()
