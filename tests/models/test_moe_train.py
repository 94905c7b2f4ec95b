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
