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
