"""Fidelity metrics: exact values on hand-made outputs, and which metrics apply to which outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeprune.fidelity import compare_outputs, is_class_scores, is_lm_logits, worst_drop


def test_identical_outputs_have_no_drop():
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    (f,) = compare_outputs([{"logits": x}], [{"logits": x.copy()}])
    assert f.cosine_mean == pytest.approx(1.0) and f.cosine_min == pytest.approx(1.0)
    assert f.max_abs_error == 0 and f.max_rel_error == 0
    assert f.top1_agreement == 1.0
    assert f.drop == pytest.approx(0.0)


def test_cosine_and_errors_by_hand():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    cand = np.array([[1.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    (f,) = compare_outputs([{"sentence_embedding": ref}], [{"sentence_embedding": cand}])
    assert f.cosine_min == pytest.approx(1 / math.sqrt(2))
    assert f.cosine_mean == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert f.max_abs_error == pytest.approx(1.0)
    assert f.max_rel_error == pytest.approx(0.5)
    assert f.top1_agreement is None  # an embedding has no classes
    assert f.drop == pytest.approx(1 - f.cosine_mean)


def test_top1_agreement_counts_flipped_rows():
    ref = np.array([[3.0, 1.0], [1.0, 3.0], [2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    cand = ref.copy()
    cand[1] = [4.0, 3.0]  # row 1 flips class
    (f,) = compare_outputs([{"logits": ref}], [{"logits": cand}])
    assert f.top1_agreement == pytest.approx(0.75)
    assert worst_drop([f]) == pytest.approx(0.25)  # worse than 1 - cosine here


def test_perplexity_of_lm_logits_by_hand():
    vocab = 4
    ids = np.array([[0, 1, 2, 3]])
    # Reference: uniform logits -> perplexity = vocab exactly.
    ref = np.zeros((1, 4, vocab), dtype=np.float32)
    # Candidate: puts log-odds 2 on the right next token everywhere.
    cand = np.zeros((1, 4, vocab), dtype=np.float32)
    for t in range(3):
        cand[0, t, ids[0, t + 1]] = 2.0
    (f,) = compare_outputs([{"logits": ref}], [{"logits": cand}], [{"input_ids": ids}])
    assert f.perplexity_reference == pytest.approx(4.0)
    expected_nll = -(2.0 - math.log(math.exp(2.0) + 3))
    assert f.perplexity_candidate == pytest.approx(math.exp(expected_nll))
    # A better perplexity is no loss; the drop comes from the other measures.
    assert f.drop == pytest.approx(max(1 - f.cosine_mean, 1 - f.top1_agreement))


def test_padded_tokens_are_not_scored():
    ids = np.array([[0, 1, 0, 0]])
    mask = np.array([[1, 1, 0, 0]])
    logits = np.zeros((1, 4, 3), dtype=np.float32)
    bad = logits.copy()
    bad[0, 2:, :] = [[0, 50, 0], [0, 50, 0]]  # garbage only at padded positions
    (f,) = compare_outputs([{"logits": logits}], [{"logits": bad}], [{"input_ids": ids, "attention_mask": mask}])
    assert f.perplexity_candidate == pytest.approx(f.perplexity_reference)


def test_zero_against_nonzero_is_not_similar():
    (f,) = compare_outputs([{"y": np.zeros((1, 3))}], [{"y": np.ones((1, 3))}])
    assert f.cosine_mean == 0.0
    (g,) = compare_outputs([{"y": np.zeros((1, 3))}], [{"y": np.zeros((1, 3))}])
    assert g.cosine_mean == 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([{"y": np.zeros((2, 3))}], [{"y": np.zeros((2, 4))}])


@pytest.mark.parametrize(
    "name, rank, expected",
    [("logits", 3, True), ("logits", 2, True), ("output", 2, True), ("sentence_embedding", 2, False),
     ("token_embeddings", 3, False), ("last_hidden_state", 3, False), ("output", 4, False)],
)
def test_which_outputs_are_class_scores(name, rank, expected):
    assert is_class_scores(name, rank) is expected


def test_lm_logits_need_rank_3():
    assert is_lm_logits("logits", 3) and not is_lm_logits("logits", 2)


def test_padded_token_positions_are_not_compared():
    """Per-token outputs of a padded batch: only the real tokens count (nothing downstream reads the rest)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 4, 3)).astype(np.float32)
    cand = ref.copy()
    cand[0, 3] = -ref[0, 3]  # a padded position, flipped
    cand[1, 2:] = 100.0  # two padded positions, far off
    feed = {"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    (f,) = compare_outputs([{"token_embeddings": ref}], [{"token_embeddings": cand}], [feed])
    assert (f.cosine_mean, f.cosine_min, f.max_abs_error) == (1.0, 1.0, 0.0)
    # the same difference on a real token is seen
    cand[0, 0] = -ref[0, 0]
    (g,) = compare_outputs([{"token_embeddings": ref}], [{"token_embeddings": cand}], [feed])
    real = ref[0, :3].reshape(-1).astype(np.float64)
    flipped = np.concatenate([-ref[0, 0], ref[0, 1:3].reshape(-1)]).astype(np.float64)
    assert g.cosine_min == pytest.approx(real @ flipped / (real @ real), abs=1e-12)


def test_top1_agreement_counts_only_real_tokens():
    ref = np.zeros((1, 3, 5), np.float32)
    ref[0, :, 1] = 1.0
    cand = ref.copy()
    cand[0, 2, 4] = 9.0  # the padded token's argmax moves
    feed = {"attention_mask": np.array([[1, 1, 0]])}
    (f,) = compare_outputs([{"scores": ref}], [{"scores": cand}], [feed])
    assert f.top1_agreement == 1.0
    (g,) = compare_outputs([{"scores": ref}], [{"scores": cand}], [{}])
    assert g.top1_agreement == pytest.approx(2 / 3)
