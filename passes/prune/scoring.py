"""Importance metrics for structured pruning: pure functions of (weights, statistics) -> score per unit.

Every metric works on *channels*: the input channels of the consuming linear (a down
projection for FFN neurons, an output projection for attention heads; a conv's output channel
later).  A unit is ``unit_size`` consecutive channels (1 for a neuron, ``head_dim`` for a head);
channel scores are summed onto units with ``reduce_units``.  Weights are passed channel-major,
``[channels, fan]``: row ``c`` holds every weight that unit channel ``c`` owns in that matrix
(a producer's output column, transposed, or the consumer's input row).

- ``magnitude``: L1 = sum |w|, L2 = sqrt(sum w^2) over all the unit's weights.
- ``wanda_sp``: sum over the unit's weights of |w| x the norm of the activation that weight
  multiplies (Wanda, An et al. 2024 structured variant): a producer weight ``W[c, j]`` multiplies
  input feature ``j``; a consumer weight ``W[c, k]`` multiplies channel ``c``.
- ``flap``: fluctuation (FLAP, An et al. 2024): Var(x_c) over calibration tokens x ||W_cons[c, :]||^2,
  i.e. how much the consumer's output moves when channel ``c`` is replaced by its mean.

Nothing here reads a model: a group hands its arrays over as ``Channels``, so metrics can be
compared on the same run and unit-tested by hand.  ``METRICS`` is the one registry of metric
names: FFN, head and conv groups score through it, and ``PruneConfig`` and the CLI's
``--prune-metric`` take their choices from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


def reduce_units(channel_scores: np.ndarray, unit_size: int = 1) -> np.ndarray:
    """Sum consecutive blocks of ``unit_size`` channels into one score per unit."""
    scores = np.asarray(channel_scores, dtype=np.float64)
    if unit_size < 1 or scores.shape[0] % unit_size:
        raise ValueError(f"{scores.shape[0]} channels do not split into units of {unit_size}")
    return scores.reshape(-1, unit_size).sum(axis=1)


def _check_rows(weights: Sequence[np.ndarray]) -> int:
    if not weights:
        raise ValueError("at least one weight matrix is needed")
    channels = {np.asarray(w).shape[0] for w in weights}
    if len(channels) != 1:
        raise ValueError(f"weight matrices disagree on the channel count: {sorted(channels)}")
    return channels.pop()


def magnitude(weights: Sequence[np.ndarray], unit_size: int = 1, p: int = 2) -> np.ndarray:
    """L1 (p=1) or L2 (p=2) norm of each unit's weights across all given channel-major matrices."""
    _check_rows(weights)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, not {p}")
    per_channel = sum(
        (np.abs(np.asarray(w, dtype=np.float64)) ** p).reshape(np.shape(w)[0], -1).sum(axis=1) for w in weights
    )
    units = reduce_units(per_channel, unit_size)
    return np.sqrt(units) if p == 2 else units


def wanda_sp(
    consumer: tuple[np.ndarray, np.ndarray],
    producers: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    unit_size: int = 1,
) -> np.ndarray:
    """sum |W| x ||x|| over the unit's weights.

    ``consumer`` is (W [channels, fan_out], norm of each channel's activation [channels]);
    each producer is (W [channels, fan_in], norm of each input feature [fan_in]).
    Norms are L2 over calibration tokens (sqrt of ``TensorStats.sq_norm``).
    """
    w_c, n_c = (np.asarray(a, dtype=np.float64) for a in consumer)
    channels = _check_rows([w_c] + [w for w, _ in producers])
    if n_c.shape != (channels,):
        raise ValueError(f"consumer norms must have shape ({channels},), not {n_c.shape}")
    per_channel = np.abs(w_c).sum(axis=1) * n_c
    for w, norm in producers:
        per_channel = per_channel + _wanda_producer(w, norm)
    return reduce_units(per_channel, unit_size)


def _wanda_producer(w: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """sum_j |W[c, j]| x ||x_j|| per channel of a producer weight (channel-major)."""
    w, norm = np.asarray(w, dtype=np.float64), np.asarray(norm, dtype=np.float64)
    if norm.shape != (w.shape[1],):
        raise ValueError(f"producer norms must have shape ({w.shape[1]},), not {norm.shape}")
    return np.abs(w) @ norm


def flap(consumer_weight: np.ndarray, variance: np.ndarray, unit_size: int = 1) -> np.ndarray:
    """Var(x_c) x ||W[c, :]||^2 per channel (consumer weight channel-major), summed per unit."""
    w = np.asarray(consumer_weight, dtype=np.float64)
    var = np.asarray(variance, dtype=np.float64)
    if var.shape != (w.shape[0],):
        raise ValueError(f"variance must have shape ({w.shape[0]},), not {var.shape}")
    return reduce_units(var * (w**2).sum(axis=1), unit_size)


# --------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Channels:
    """What a group hands a metric; each part is built only when the metric asks for it.

    ``weights()``: every weight the units own, channel-major ``[channels, fan]``.
    ``consumers()``: one ``(rows, stats, at, channels)`` per consumer piece: the consumer's weight
    rows for the group channels ``channels``, the statistics of the activation they multiply
    (``TensorStats``) and the rows' positions ``at`` in those statistics.
    ``producers()``: ``(weight channel-major, statistics of the input it multiplies)`` per producer.
    """

    count: int
    weights: Callable[[], list[np.ndarray]]
    consumers: Callable[[], list[tuple[np.ndarray, Any, slice, slice]]]
    producers: Callable[[], list[tuple[np.ndarray, Any]]] = list


@dataclasses.dataclass(frozen=True)
class Metric:
    """One importance metric: ``score(channels, unit_size)`` -> one score per unit."""

    name: str
    doc: str
    score: Callable[[Channels, int], np.ndarray]
    needs_stats: bool = False
    """Reads calibration statistics of the consumers' inputs."""
    producer_stats: bool = False
    """Also reads statistics of the producers' inputs."""


def _magnitude(p: int) -> Callable[[Channels, int], np.ndarray]:
    return lambda ch, unit_size: magnitude(ch.weights(), unit_size, p=p)


def _flap(ch: Channels, unit_size: int) -> np.ndarray:
    total = np.zeros(ch.count)
    for rows, st, at, channels in ch.consumers():
        total[channels] += flap(rows, st.var[at])
    return reduce_units(total, unit_size)


def _wanda(ch: Channels, unit_size: int) -> np.ndarray:
    total = np.zeros(ch.count)
    for rows, st, at, channels in ch.consumers():
        total[channels] += wanda_sp((rows, np.sqrt(st.sq_norm[at])))
    for w, st in ch.producers():
        total = total + _wanda_producer(w, np.sqrt(st.sq_norm))
    return reduce_units(total, unit_size)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("flap", "fluctuation: Var(x_c) x ||W_cons[c, :]||^2", _flap, needs_stats=True),
        Metric("wanda", "Wanda-sp: sum |W| x ||x|| over the unit's weights", _wanda, needs_stats=True, producer_stats=True),
        Metric("magnitude", "L2 norm of the unit's weights", _magnitude(2)),
        Metric("magnitude_l1", "L1 norm of the unit's weights", _magnitude(1)),
    )
}
"""Every importance metric, by the name a recipe or ``--prune-metric`` gives."""
