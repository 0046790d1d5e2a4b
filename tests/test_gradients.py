"""Gradient summaries and the q/k/v/head split, on arbitrary arrays (hypothesis) against plain numpy."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.train.gradients import FlatLayout, qkv_breakdown, summarize, summarize_all
from engine.manifest import Parameter, QkvLayout

finite = st.floats(-1e3, 1e3, width=32)
anything = st.one_of(finite, st.sampled_from([0.0, np.nan, np.inf, -np.inf]))


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=anything),
       arrays(np.float32, 1, elements=finite))
def test_summary_statistics(grad, w):
    before = np.full(grad.shape, w[0], np.float32)
    after = before + 0.5
    s = summarize("p", grad, before, after)
    finite_part = grad[np.isfinite(grad)].astype(np.float64)
    assert s.shape == grad.shape
    assert s.nonfinite_count == int((~np.isfinite(grad)).sum())
    assert s.zero_fraction == np.count_nonzero(grad == 0) / grad.size
    if finite_part.size:
        assert math.isclose(s.mean, finite_part.mean(), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(s.max_abs, np.abs(finite_part).max()) and s.min == finite_part.min() and s.max == finite_part.max()
        assert math.isclose(s.std, finite_part.std(), rel_tol=1e-9, abs_tol=1e-9)
    if s.nonfinite_count == 0:
        assert math.isclose(s.l2_norm, np.linalg.norm(finite_part), rel_tol=1e-9)
    else:
        assert math.isnan(s.l2_norm)  # a norm over NaN/Inf is not a number; the count says why
    norm = float(np.linalg.norm(before.astype(np.float64)))
    assert math.isclose(s.param_norm, norm)
    delta = np.linalg.norm(after.astype(np.float64) - before.astype(np.float64))
    if norm > 0:
        assert math.isclose(s.update_ratio, delta / norm, rel_tol=1e-9)
    else:
        assert s.update_ratio == math.inf


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_qkv_split_matches_hand_slicing(heads, dim_head, dim, seed):
    grad = np.random.default_rng(seed).standard_normal((3 * heads * dim_head, dim)).astype(np.float32)
    q = qkv_breakdown(QkvLayout("blk.to_qkv.weight", 0, heads, dim_head), {"blk.to_qkv.weight": grad})
    inner = heads * dim_head
    for part, (norm, per_head) in enumerate([(q.q_norm, q.q_head_norms), (q.k_norm, q.k_head_norms),
                                             (q.v_norm, q.v_head_norms)]):
        rows = grad[part * inner:(part + 1) * inner].astype(np.float64)
        assert math.isclose(norm, np.linalg.norm(rows), rel_tol=1e-9)
        assert len(per_head) == heads
        for h in range(heads):
            assert math.isclose(per_head[h], np.linalg.norm(rows[h * dim_head:(h + 1) * dim_head]), rel_tol=1e-9)


def test_global_norm_is_the_norm_of_everything():
    grads = np.array([3.0, 0.0, 4.0], np.float32)  # two parameters' gradients, back to back
    squares = FlatLayout([Parameter("a", (2,), True), Parameter("b", (1,), True)]).squares(grads)
    assert math.sqrt(squares.sum()) == 5.0  # the engine's global norm


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=5), st.integers(0, 2**31 - 1),
       st.booleans(), st.booleans())
def test_vectorized_summaries_equal_the_per_parameter_ones(shapes, seed, constant, with_nan):
    """summarize_all (one pass over a flat vector) == summarize (one parameter at a time)."""
    rng = np.random.default_rng(seed)
    sizes = [a * b for a, b in shapes]
    grads = rng.standard_normal(sum(sizes)).astype(np.float32) * 10.0 ** rng.integers(-6, 3)
    if constant:  # a constant gradient: the variance formula must not cancel into noise
        grads[:sizes[0]] = np.float32(123.456)
    grads[rng.random(grads.size) < 0.1] = 0.0
    if with_nan:
        grads[rng.integers(grads.size)] = np.nan
    before = rng.standard_normal(grads.size).astype(np.float32)
    after = before + rng.standard_normal(grads.size).astype(np.float32) * 1e-3
    names = [f"p{i}" for i in range(len(shapes))]
    vectorized = summarize_all(FlatLayout([Parameter(n, s, True) for n, s in zip(names, shapes)]), grads, before,
                               after)
    offsets = np.cumsum([0] + sizes)
    for s, name, shape, a, b in zip(vectorized, names, shapes, offsets[:-1], offsets[1:]):
        ref = summarize(name, grads[a:b].reshape(shape), before[a:b], after[a:b])
        assert s.name == ref.name and s.shape == ref.shape and s.nonfinite_count == ref.nonfinite_count
        for field in ("l2_norm", "mean", "std", "min", "max", "max_abs", "zero_fraction", "param_norm", "update_ratio"):
            x, y = getattr(s, field), getattr(ref, field)
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7 * (abs(y) + 1e-30)) \
                or abs(x - y) <= 1e-6 * max(abs(ref.max_abs), 1e-30), (field, x, y)


def test_a_weight_at_all_zeros_has_an_infinite_update_ratio_once_it_moves():
    grads = np.ones(4, np.float32)
    before = np.zeros(4, np.float32)  # two parameters of two values, both at zero
    after = np.array([0.0, 0.0, 0.5, 0.0], np.float32)  # the second one moved
    stayed, moved = summarize_all(FlatLayout([Parameter("a", (2,), True), Parameter("b", (2,), True)]), grads, before,
                                  after)
    assert (stayed.update_ratio, moved.update_ratio) == (0.0, math.inf)
    assert moved.update_ratio == summarize("b", grads[2:], before[2:], after[2:]).update_ratio
