"""The MoE training recipe's pieces that need no training: data splits, the math generator, specialisation, loading."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import BadInputError
from edgeprune.models import moe_train


def test_math_text_is_seeded_and_answers_are_right():
    text = moe_train._math(2000)
    assert text == moe_train._math(2000) and len(text) >= 2000
    q, a = text.splitlines()[:2]
    assert q.startswith("Question: ") and a.startswith("Answer: ")
    if q.startswith("Question: What is ") and "+" in q:
        left, right = q[len("Question: What is ") : -1].split(" + ")
        assert int(a.split()[1]) == int(left) + int(right)


def test_split_holds_out_the_last_tenth():
    train, held = moe_train.split("x" * 1000)
    assert (len(train), len(held)) == (900, 100)
    windows = moe_train.held_out_windows(np.arange(1000), 4, seq_len=10)
    assert windows.shape == (4, 10) and windows[0, 0] == 0 and windows[-1, -1] == 998


def test_specialisation_is_zero_for_identical_routing_and_positive_otherwise():
    same = {"a": [[1.0, 1.0, 0.0, 0.0]], "b": [[1.0, 1.0, 0.0, 0.0]]}
    apart = {"a": [[2.0, 0.0, 0.0, 0.0]], "b": [[0.0, 0.0, 2.0, 0.0]]}
    assert moe_train.specialisation(same) == {"mean_tv_distance_per_layer": [0.0]}
    assert moe_train.specialisation(apart) == {"mean_tv_distance_per_layer": [0.5]}


def test_load_without_weights_is_one_sentence(tmp_path):
    with pytest.raises(BadInputError) as err:
        moe_train.load(tmp_path)
    assert str(err.value) == f"{tmp_path} holds no trained MoE (model.safetensors): train it with python -m edgeprune.models.moe_train {tmp_path}."


def test_lr_factor_warms_up_then_decays_to_a_tenth():
    assert [moe_train.lr_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert moe_train.lr_factor(4, 4, steps=14) == pytest.approx(1.0)
    assert moe_train.lr_factor(9, 4, steps=14) == pytest.approx(0.55)
    assert moe_train.lr_factor(14, 4, steps=14) == pytest.approx(0.1)
    assert moe_train.lr_factor(500, 4, elapsed_share=0.5) == pytest.approx(0.55)
    assert moe_train.lr_factor(500, 4, elapsed_share=1.7) == pytest.approx(0.1)


def test_global_balance_loss_counts_frequencies_over_the_recent_batches():
    torch = pytest.importorskip("torch")
    uniform = [torch.zeros(6, 4, requires_grad=True)]  # every expert equally likely; top-2 of ties
    recent: list = []
    loss = moe_train.global_balance_loss(uniform, 2, recent)
    assert len(recent) == 1 and float(loss) == pytest.approx(4 * float((recent[0][0][0] / 6 * 0.25).sum()))
    # a batch that routes everything to experts 0 and 1 is penalised less when earlier batches used experts 2 and 3
    skewed = torch.tensor([[5.0, 5.0, 0.0, 0.0]] * 6, requires_grad=True)
    alone = moe_train.global_balance_loss([skewed], 2, [])
    other = torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 6)
    history: list = []
    moe_train.global_balance_loss([other], 2, history)
    pooled = moe_train.global_balance_loss([skewed], 2, history)
    assert len(history) == 2 and float(pooled) < float(alone)
    # pooled over both batches every expert is used alike, so nothing pushes this batch off its experts; alone it is pushed
    pooled.backward()
    assert float(skewed.grad.abs().sum()) == pytest.approx(0.0, abs=1e-9)
    alone.backward()
    assert float(skewed.grad[:, :2].sum()) > 0 > float(skewed.grad[:, 2:].sum())


def test_train_refuses_an_unknown_recipe(tmp_path):
    with pytest.raises(BadInputError, match="batches must be one of"):
        moe_train.train(tmp_path, steps=1, batches="shuffled")


def test_sequence_mi_loss_rewards_sequences_that_keep_to_their_own_experts():
    torch = pytest.importorskip("torch")
    uniform = torch.zeros(2 * 3, 4)  # 2 sequences of 3 tokens, 4 experts
    assert float(moe_train.sequence_mi_loss([uniform], 2)) == pytest.approx(0.0, abs=1e-6)
    apart = torch.tensor([[30.0, 0, 0, 0]] * 3 + [[0, 30.0, 0, 0]] * 3)  # each sequence on its own expert
    assert float(moe_train.sequence_mi_loss([apart], 2)) == pytest.approx(-np.log(2), abs=1e-6)
    same = torch.tensor([[30.0, 0, 0, 0]] * 6)  # concentrated but on one expert for both: no information, loss 0
    assert float(moe_train.sequence_mi_loss([same], 2)) == pytest.approx(0.0, abs=1e-6)
