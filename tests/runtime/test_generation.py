"""runtime.generation: chunked prefill gives the one-shot prefill's greedy tokens, and the public
single-model ``Generator`` (the private ``_Generator`` name still works for older callers)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import BadInputError
from edgeprune.runtime import generation
from edgeprune.runtime.generation import Generator, measure_generation

pytest.importorskip("optimum.exporters.onnx")

PROMPT = np.random.default_rng(5).integers(0, 96, 23).tolist()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("gen_llama"))


class _CountingSession:
    """The session with its runs counted, to see how many steps a generation took."""

    def __init__(self, session):
        self._session, self.runs = session, 0

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding):
        self.runs += 1
        return self._session.run_with_iobinding(binding)


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])
def test_chunked_prefill_gives_the_one_shot_greedy_tokens(decoder, chunk):
    one_shot = Generator.open(decoder).generate(PROMPT, 12)
    assert len(set(one_shot)) > 1  # not a degenerate continuation
    session = _CountingSession(Generator.open(decoder).session)
    tokens = Generator(session, prefill_chunk=chunk).generate(PROMPT, 12)
    assert tokens == one_shot
    assert session.runs == -(-len(PROMPT) // chunk) + 11  # prefill steps, then one per decoded token


def test_measure_generation_with_prefill_chunk(decoder):
    results = measure_generation({"one": str(decoder)}, PROMPT, new_tokens=8, rounds=1, warmup=0)
    chunked = measure_generation({"chunked": str(decoder)}, PROMPT, new_tokens=8, rounds=1, warmup=0, prefill_chunk=4)
    assert chunked["chunked"].tokens == results["one"].tokens
    assert (chunked["chunked"].prefill_chunk, results["one"].prefill_chunk) == (4, None)
    assert chunked["chunked"].to_dict()["prefill_chunk"] == 4


def test_generator_opens_in_memory_models_and_keeps_its_old_name(decoder):
    import onnx_ir as ir

    assert generation._Generator is Generator
    tokens, prefill, decode = generation._Generator(Generator.open(decoder).session).run(np.asarray(PROMPT), 5)
    assert tokens == Generator.open(ir.load(decoder)).generate(PROMPT, 5)
    assert len(tokens) == 5 and prefill > 0 and decode > 0
    assert len(Generator.open(decoder).generate(PROMPT, 1)) == 1  # the prefill's token only


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_bad_prefill_chunk_is_refused(decoder, chunk):
    with pytest.raises(BadInputError, match=r"prefill_chunk must be a positive number of tokens or None"):
        Generator.open(decoder, prefill_chunk=chunk)
    with pytest.raises(BadInputError, match=r"prefill_chunk must be a positive number of tokens or None"):
        measure_generation({"m": str(decoder)}, PROMPT, new_tokens=2, rounds=1, warmup=0, prefill_chunk=chunk)


# ----------------------------------------------------------------------------- one cache buffer for past and present


@pytest.fixture(scope="module")
def fused_decoder(decoder, tmp_path_factory):
    """The decoder with its attention fused into GroupQueryAttention (present.* are GQA outputs)."""
    import onnx_ir as ir

    from edgeprune.passes.fused_attention import FusedAttentionPass

    path = tmp_path_factory.mktemp("gen_fused") / "fused.onnx"
    ir.save(FusedAttentionPass()(ir.load(decoder)).model, path)
    return path


class _RecordingGenerator(Generator):
    """Keeps every step's last-position logits."""

    def _step(self, ids, past_len, past):
        logits, present = super()._step(ids, past_len, past)
        self.seen = getattr(self, "seen", []) + [logits.copy()]
        return logits, present


@pytest.mark.parametrize("chunk", [None, 1, 6])
def test_shared_buffer_gives_the_same_logits_and_tokens(fused_decoder, chunk):
    plain = _RecordingGenerator(Generator.open(fused_decoder).session, prefill_chunk=chunk, share_buffer=False)
    shared = _RecordingGenerator(Generator.open(fused_decoder).session, prefill_chunk=chunk)
    assert shared.share_buffer and not plain.share_buffer
    tokens = shared.generate(PROMPT, 12)
    assert tokens == plain.generate(PROMPT, 12) and len(set(tokens)) > 1
    assert len(shared.seen) == len(plain.seen)
    for a, b in zip(shared.seen, plain.seen):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_shared_buffer_writes_in_place(fused_decoder):
    """The step hands back the very buffers it was given (GQA wrote into them), not new present tensors."""
    import onnxruntime as ort

    from edgeprune import kv_cache

    gen = Generator.open(fused_decoder)
    past = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, e.heads, 10, e.head_dim), np.float32)) for e in gen.cache]
    _, present = gen._step(np.array([[5, 6, 7]]), 0, past)
    assert present is past
    keys = present[0].numpy()
    assert np.abs(keys[0, :, :3]).min() > 0 and not keys[0, :, 3:].any()  # three rows written, the rest untouched
    assert kv_cache.session_cache(gen.session) == gen.cache


def test_shared_buffer_is_only_used_where_gqa_owns_the_cache(decoder, fused_decoder):
    assert not Generator.open(decoder).share_buffer  # optimum's Concat cache: present is a new tensor
    with pytest.raises(BadInputError, match="share_buffer=True needs every present"):
        Generator.open(decoder, share_buffer=True)
    assert Generator.open(fused_decoder, share_buffer=True).share_buffer


def test_shared_buffer_on_a_genai_builder_model(tmp_path):
    """onnxruntime-genai's form (rotary inside GQA, no position_ids input): the same tokens either way."""
    from tiny_models import genai_style_decoder

    path = genai_style_decoder(tmp_path)
    shared, plain = Generator.open(path), Generator.open(path, share_buffer=False)
    assert shared.share_buffer
    prompt = np.random.default_rng(2).integers(0, 48, 9).tolist()
    assert shared.generate(prompt, 10) == plain.generate(prompt, 10)


@pytest.mark.parametrize("fused", [False, True])
def test_logits_read_back_without_a_static_vocabulary(decoder, fused_decoder, fused):
    """The logits are written into a preallocated array when the vocabulary size is fixed; else read back."""
    path = fused_decoder if fused else decoder
    fast = Generator.open(path)
    assert fast.vocab == 96
    slow = Generator.open(path)
    slow.vocab = None
    assert slow.generate(PROMPT, 10) == fast.generate(PROMPT, 10)
