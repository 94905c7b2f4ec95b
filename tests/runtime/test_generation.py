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


# ----------------------------------------------------------------------------- the decode loop's buffers, spinning


def _reference_greedy(path, prompt, new_tokens):
    """Greedy decoding the plain way: session.run with numpy feeds, the whole present fed back as past, a new
    mask and positions every step (no IOBinding, nothing reused), to hold the generator's loop to."""
    import onnxruntime as ort

    from edgeprune import kv_cache

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = kv_cache.session_cache(Generator.open(path).session)  # the symbolic head size read off the graph
    names = {i.name for i in session.get_inputs()}
    past = kv_cache.empty_cache(cache, 1)
    ids, done, tokens = np.asarray(prompt, dtype=np.int64)[None, :], 0, []
    for _ in range(new_tokens):
        total = done + ids.shape[1]
        feeds = {"input_ids": ids, **past}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(done, total, dtype=np.int64)[None, :]
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        tokens.append(int(np.argmax(outputs[session.get_outputs()[0].name][0, -1])))
        past = {e.past: outputs[e.present] for e in cache}
        ids, done = np.array([[tokens[-1]]], dtype=np.int64), total
    return tokens


@pytest.fixture(scope="module")
def genai_decoder(tmp_path_factory):
    from tiny_models import genai_style_decoder

    return genai_style_decoder(tmp_path_factory.mktemp("gen_genai"))


@pytest.mark.parametrize("model", ["decoder", "fused_decoder", "genai_decoder"])
def test_generator_gives_the_reference_loops_tokens(request, model):
    path = request.getfixturevalue(model)
    prompt = PROMPT if model != "genai_decoder" else np.random.default_rng(2).integers(0, 48, 9).tolist()
    reference = _reference_greedy(path, prompt, 14)
    assert len(set(reference)) > 1
    gen = Generator.open(path)
    assert gen.share_buffer == (model != "decoder")
    assert gen.generate(prompt, 14) == reference
    assert Generator.open(path, share_buffer=False).generate(prompt, 14) == reference
    assert Generator.open(path, prefill_chunk=4).generate(prompt, 14) == reference


def test_one_generator_reused_across_prompts_and_lengths(decoder, fused_decoder):
    """The kept mask/position/token/logits buffers carry nothing from one generation into the next, also when a
    longer generation grows them."""
    short, long = PROMPT[:3], np.random.default_rng(9).integers(0, 96, 40).tolist()
    for path in (decoder, fused_decoder):
        gen = Generator.open(path)
        first = gen.generate(short, 4)
        assert gen._ones.shape[1] < len(long) + 30
        assert gen.generate(long, 30) == _reference_greedy(path, long, 30)
        assert gen._ones.shape[1] >= len(long) + 30 and gen._ones.all()
        assert np.array_equal(gen._positions[0], np.arange(gen._positions.shape[1]))
        assert gen.generate(short, 4) == first == _reference_greedy(path, short, 4)


class _BindingSpy:
    """The session with every IOBinding it hands out recorded, and each binding's calls counted by method."""

    def __init__(self, session):
        self._session, self.bindings, self.runs = session, [], []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def io_binding(self):
        spy = _CallCounter(self._session.io_binding())
        self.bindings.append(spy)
        return spy

    def run_with_iobinding(self, binding):
        self.runs.append(binding)
        return self._session.run_with_iobinding(binding._binding)


class _CallCounter:
    def __init__(self, binding):
        self._binding, self.calls = binding, {}

    def __getattr__(self, name):
        method = getattr(self._binding, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, []) + [args]
            return method(*args, **kwargs)

        return counted


def test_shared_buffer_decode_binds_the_cache_and_the_logits_once(fused_decoder):
    session = _BindingSpy(Generator.open(fused_decoder).session)
    gen = Generator(session)
    tokens = gen.generate(PROMPT, 12)
    assert tokens == _reference_greedy(fused_decoder, PROMPT, 12)
    assert len(session.bindings) == 1 and len(session.runs) == 12  # one binding: the prefill and 11 decode steps
    binding = session.bindings[0]
    assert all(run is binding for run in session.runs)
    logits_binds = [args for args in binding.calls["bind_ortvalue_output"] if args[0] == gen.logits]
    assert len(logits_binds) == 2  # the prompt's [1, 23, vocab] logits, then the one-token array for every decode step
    assert len(binding.calls["bind_ortvalue_output"]) == 2 + len(gen.cache)  # each present bound once, to its past
    assert len(binding.calls["bind_cpu_input"]) == 12 * len(gen.inputs)  # the step inputs, every step
    decode_ids = [args[1] for args in binding.calls["bind_cpu_input"] if args[0] == "input_ids"][1:]
    assert all(ids is gen._token for ids in decode_ids)  # the token is written into one array, not a new one


@pytest.mark.parametrize("fused", [False, True])
def test_decode_steps_reuse_one_logits_array(decoder, fused_decoder, fused):
    """Every one-token step writes its logits into the same array (valid until the next step); a prompt step
    gets its own array of its length."""
    gen = _RecordingGenerator(Generator.open(fused_decoder if fused else decoder).session)
    steps = []
    real = Generator._step

    def step(ids, past_len, past):
        logits, present = real(gen, ids, past_len, past)
        steps.append((ids.shape[1], logits))
        return logits, present

    gen._step = step
    assert gen.generate(PROMPT, 6) == _reference_greedy(fused_decoder if fused else decoder, PROMPT, 6)
    (n, prompt_logits), decode = steps[0], steps[1:]
    assert n == len(PROMPT) and len(decode) == 5 and all(k == 1 for k, _ in decode)
    array = gen._one_logits[0]
    assert not np.shares_memory(prompt_logits, array)
    assert all(np.shares_memory(logits, array) for _, logits in decode)


def test_plain_cache_gets_a_new_binding_per_step(decoder):
    session = _BindingSpy(Generator.open(decoder).session)
    assert Generator(session).generate(PROMPT, 7) == _reference_greedy(decoder, PROMPT, 7)
    assert len(session.bindings) == 7 and [b for b in session.runs] == session.bindings
    for binding in session.bindings:  # present.* come back as new tensors, fed as the next step's past
        assert len([a for a in binding.calls["bind_output"] if a[0].startswith("present")]) == len(Generator(session).cache)


def test_generator_open_spins_and_other_sessions_do_not(decoder):
    from edgeprune.runtime.session import make_session

    def spins(session):
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spins(Generator.open(decoder).session) == "1"  # ORT's and onnxruntime-genai's policy for the one hot loop
    assert spins(Generator.open(decoder, spinning=False).session) == "0"
    assert spins(make_session(decoder)) == "0" and spins(make_session(decoder, spinning=True)) == "1"
    with pytest.raises(BadInputError, match="spinning must be True or False"):
        make_session(decoder, spinning="yes")


@pytest.mark.parametrize("spinning", [None, False, True])
def test_measure_generation_gives_every_model_one_spinning_policy(decoder, fused_decoder, monkeypatch, spinning):
    seen = []
    real = generation.make_session

    def recording(*args, **kwargs):
        session = real(*args, **kwargs)
        seen.append(session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return session

    monkeypatch.setattr(generation, "make_session", recording)
    policy = {} if spinning is None else {"spinning": spinning}  # None: the default, edgeprune's no-spin
    results = measure_generation({"a": str(decoder), "b": str(fused_decoder)}, PROMPT, new_tokens=5, rounds=1, warmup=0,
                                 **policy)
    assert seen == ["1" if spinning else "0"] * 2
    assert results["a"].tokens == results["b"].tokens == _reference_greedy(decoder, PROMPT, 5)
