"""Tests for fragdefense.metrics.functional: exactness vs scipy, brute-force set metrics, properties, errors."""

from __future__ import annotations

import doctest
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fragdefense.metrics.functional as MF
from fragdefense.metrics.functional import (
    center_of_mass,
    center_shift,
    kendall_tau,
    lens_topk,
    mask_mass,
    pointing_game,
    spearman,
    topk_div,
    topk_intersection,
)

# ------------------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------------------


def _ref_rank_corr(fn, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """scipy per row, with our documented answer where scipy returns NaN (a constant row)."""
    fa = a.reshape(a.shape[0], -1).double().numpy()
    fb = b.reshape(b.shape[0], -1).double().numpy()
    out = []
    for x, y in zip(fa, fb):
        cx, cy = bool(np.all(x == x[0])), bool(np.all(y == y[0]))
        if cx and cy:
            out.append(1.0)
        elif cx or cy:
            out.append(0.0)
        else:
            out.append(fn(x, y)[0])
    return np.asarray(out)


def _ref_spearman(a, b):
    return _ref_rank_corr(scipy.stats.spearmanr, a, b)


def _ref_kendall(a, b):
    return _ref_rank_corr(scipy.stats.kendalltau, a, b)


def _bf_topk(x: list[float], k: int) -> set[int]:
    """Top-k flat indices; ties broken towards the lower index."""
    return set(sorted(range(len(x)), key=lambda i: (-x[i], i))[:k])


def _bf_window(t: set[int], w: int, h: int, wd: int) -> set[int]:
    out = set()
    for p in t:
        r, c = divmod(p, wd)
        for dr in range(-w, w + 1):
            for dc in range(-w, w + 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < wd:
                    out.add(rr * wd + cc)
    return out


def _bf_topk_div(x: list[float], k: int, w: int, h: int, wd: int) -> set[int] | None:
    """Greedy top-k-div, pure Python; None if fewer than k pixels can be taken."""
    avail = set(range(len(x)))
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    picks: set[int] = set()
    while len(picks) < k:
        nxt = next((i for i in order if i in avail), None)
        if nxt is None:
            return None
        picks.add(nxt)
        avail -= _bf_window({nxt}, w, h, wd)
    return picks


def _bf_lens(xa, xb, k, w, h, wd, mode, diverse):
    if diverse:
        ta, tb = _bf_topk_div(xa, k, w, h, wd), _bf_topk_div(xb, k, w, h, wd)
    else:
        ta, tb = _bf_topk(xa, k), _bf_topk(xb, k)
    if mode == "recall":
        return len(_bf_window(ta, w, h, wd) & tb) / k
    return len(ta & _bf_window(tb, w, h, wd)) / k


def _maps(shape, seed, levels=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if levels is not None:
        x = torch.floor(x * levels)
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------------------
# Spearman / Kendall vs scipy
# ------------------------------------------------------------------------------------------------------------

RANK_FNS = [(spearman, _ref_spearman), (kendall_tau, _ref_kendall)]
RANK_IDS = ["spearman", "kendall"]


@pytest.mark.parametrize(("fn", "ref"), RANK_FNS, ids=RANK_IDS)
@pytest.mark.parametrize("shape", [(16, 37), (8, 6, 7), (4, 1000)])
def test_rank_corr_random_matches_scipy(fn, ref, shape):
    a = _maps(shape, 0)
    b = 0.6 * a + 0.4 * _maps(shape, 1)  # correlated, so values span [-1, 1] meaningfully
    np.testing.assert_allclose(fn(a, b).numpy(), ref(a, b), atol=1e-6, rtol=0)
    np.testing.assert_allclose(fn(a, _maps(shape, 2)).numpy(), ref(a, _maps(shape, 2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("fn", "ref"), RANK_FNS, ids=RANK_IDS)
@pytest.mark.parametrize(("levels_a", "levels_b"), [(2, 3), (4, 4), (7, 2), (3, 50)])
def test_rank_corr_ties_match_scipy(fn, ref, levels_a, levels_b):
    a = _maps((24, 9, 11), 3, levels=levels_a)
    b = torch.floor((a + _maps((24, 9, 11), 4, levels=levels_b)) / 2)  # tie-heavy, correlated
    np.testing.assert_allclose(fn(a, b).numpy(), ref(a, b), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("fn", "ref"), RANK_FNS, ids=RANK_IDS)
def test_rank_corr_constant_rows_documented(fn, ref):
    a = _maps((6, 20), 5)
    b = _maps((6, 20), 6, levels=3)
    a[0] = 0.0  # all-zero vs non-constant -> 0
    b[1] = 2.5  # non-constant vs constant -> 0
    a[2], b[2] = 0.0, 0.0  # both all-zero -> 1
    a[3], b[3] = 1.0, -3.0  # both constant (different values) -> 1
    out = fn(a, b)
    assert not torch.isnan(out).any()
    assert out[:4].tolist() == [0.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(out.numpy(), ref(a, b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fn", [spearman, kendall_tau], ids=RANK_IDS)
def test_rank_corr_single_element_maps(fn):
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[5.0], [-1.0]])
    assert fn(a, b).tolist() == [1.0, 1.0]  # D == 1 counts as constant


@pytest.mark.parametrize(("fn", "ref"), RANK_FNS, ids=RANK_IDS)
def test_rank_corr_224_float64_exact(fn, ref):
    a = _maps((3, 224, 224), 7)
    b = a + 0.5 * _maps((3, 224, 224), 8)
    b[2] = torch.floor(b[2] * 20)  # one tie-heavy row next to tie-free rows
    np.testing.assert_allclose(fn(a, b).numpy(), ref(a, b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fn", [spearman, kendall_tau], ids=RANK_IDS)
def test_rank_corr_batch_independent(fn):
    """Rows with and without ties in one batch give the same values as scored alone."""
    a = _maps((5, 64), 9)
    b = _maps((5, 64), 10)
    a[1] = torch.floor(a[1] * 3)
    b[3] = torch.floor(b[3] * 2)
    whole = fn(a, b)
    alone = torch.cat([fn(a[i : i + 1], b[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, alone, atol=0, rtol=0)


@pytest.mark.parametrize("fn", [spearman, kendall_tau], ids=RANK_IDS)
def test_rank_corr_float32_same_as_float64(fn):
    a = _maps((4, 300), 11, dtype=torch.float32)
    b = _maps((4, 300), 12, levels=9, dtype=torch.float32)
    out = fn(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), fn(a.double(), b.double()), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("sparse_fraction", "runs_fraction"),
    [(0.0, 0.0), (0.125, 0.25), (1.0, 0.0), (0.0, 1.0)],
    ids=["cummax", "auto", "sparse", "runs"],
)
def test_average_ranks_all_tie_paths_match_scipy_rankdata(sparse_fraction, runs_fraction):
    g = torch.Generator().manual_seed(21)
    rows = [
        torch.rand(40, generator=g),  # no ties (a row the tie pass must leave alone)
        torch.floor(torch.rand(40, generator=g) * 3),  # heavy ties
        torch.tensor([5.0] * 40),  # one run: the whole row
        torch.cat([torch.zeros(3), torch.rand(34, generator=g) + 1, torch.full((3,), 9.0)]),  # runs at both ends
        torch.cat([torch.full((3,), 9.0), torch.rand(37, generator=g) + 1]).neg(),  # run at the start
        torch.floor(torch.rand(40, generator=g) * 30),  # short runs of 2-3
    ]
    x = torch.stack(rows)
    sv = torch.sort(x, dim=-1).values  # row 3 ends with 9s and row 4 starts with -9s: runs touch across rows
    got = MF._twice_centred_rank_sorted(sv, sparse_fraction=sparse_fraction, runs_fraction=runs_fraction)
    want = torch.stack([torch.from_numpy(scipy.stats.rankdata(r.numpy())) for r in sv]) * 2 - 41
    assert got.dtype == torch.int32 and torch.equal(got.double(), want)
    # rows without ties next to rows with ties
    mixed = torch.stack([rows[0], rows[5], rows[0]])
    sv = torch.sort(mixed, dim=-1).values
    want = torch.stack([torch.from_numpy(scipy.stats.rankdata(r.numpy())) for r in sv]) * 2 - 41
    got = MF._twice_centred_rank_sorted(sv, sparse_fraction=sparse_fraction, runs_fraction=runs_fraction)
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_spearman_finds_non_finite_anywhere(value):
    for pos in [(0, 0, 0), (1, 2, 3), (1, 3, 4)]:
        bad = _GOOD.clone()
        bad[pos] = value
        with pytest.raises(ValueError, match=r"`b` contains (NaN|Inf)"):
            spearman(_GOOD, bad)


def test_kendall_inversions_against_brute_force():
    g = torch.Generator().manual_seed(13)
    y = torch.randint(0, 9, (20, 33), generator=g)
    brute = [sum(int(r[i] > r[j]) for i, j in itertools.combinations(range(33), 2)) for r in y.tolist()]
    assert MF._count_inversions(y).tolist() == brute


@pytest.mark.parametrize(("levels", "d"), [(300, 300), (2, 257), (64, 200), (65, 200), (1, 10), (1000, 2)])
def test_kendall_inversions_brute_force_numpy(levels, d):
    """Permutations and tie-heavy rows, maxima at and just past a power of two (bit-level edges)."""
    g = torch.Generator().manual_seed(levels + d)
    y = torch.randint(0, levels, (6, d), generator=g)
    y[0] = torch.randperm(d, generator=g) % max(levels, 1)
    yn = y.numpy()
    brute = [int(np.triu(r[:, None] > r[None, :], 1).sum()) for r in yn]
    assert MF._count_inversions(y).tolist() == brute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_rank_corr_float32_keys_at_scale_match_scipy(dtype):
    """The float32-key Kendall path and the threaded CPU sort, on 224 x 224 maps with negative values, signed
    zeros (-0.0 == +0.0 is a tie) and tie-heavy rows; float16 also takes torch.sort instead of numpy."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(4, 224, 224, generator=g)
    b = 0.5 * a + torch.randn(4, 224, 224, generator=g)
    a[1] = torch.round(a[1] * 2)  # tie-heavy, many -0.0 and +0.0 ...
    a[1, :112] = torch.where(a[1, :112] == 0, -0.0, a[1, :112])  # ... of both signs
    b[2] = torch.floor(b[2] * 3)
    a, b = a.to(dtype), b.to(dtype)
    assert bool(torch.signbit(a[1]).logical_and(a[1] == 0).any())
    for fn, ref in RANK_FNS:
        out = fn(a, b)
        assert out.dtype == dtype
        # float16 only rounds the returned value (resolution 2**-11 near 0.5); the statistic itself is exact
        np.testing.assert_allclose(out.double().numpy(), ref(a, b), atol=1e-6 if dtype == torch.float32 else 5e-4)
        torch.testing.assert_close(out, fn(a.float(), b.float()).to(dtype), atol=0, rtol=0)


def test_kendall_float64_rank_keys_match_scipy():
    """float64 values that are not float32 (differences below float32 resolution) take the dense-rank keys."""
    g = torch.Generator().manual_seed(22)
    base = torch.rand(3, 400, generator=g, dtype=torch.float64)
    a = 1.0 + base * 1e-9  # all equal once rounded to float32
    b = base + 1e-10 * torch.rand(3, 400, generator=g, dtype=torch.float64)
    a[2, ::3] = a[2, 0]  # ties in a
    assert MF._float32_order_key(a) is None
    np.testing.assert_allclose(kendall_tau(a, b).numpy(), _ref_kendall(a, b), atol=1e-12, rtol=0)
    assert kendall_tau(a, b)[0] > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.float16])
@pytest.mark.parametrize("shape", [(3, 17), (4, 20000), (1, 40000)])
def test_sort_rows_matches_torch_sort(dtype, shape):
    """numpy row sort (threaded above 2**15 elements) = torch.sort: values, and indices that reproduce them."""
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * 10).round().to(dtype)  # with ties
    if dtype.is_floating_point:
        x[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    x = x.t().contiguous().t()  # a non-contiguous view
    x.requires_grad_(dtype.is_floating_point)
    want = torch.sort(x.detach(), dim=-1).values
    vals, idx = MF._sort_rows(x)
    torch.testing.assert_close(vals, want, equal_nan=True, atol=0, rtol=0)
    assert idx.dtype == torch.int64
    torch.testing.assert_close(x.detach().gather(1, idx), want, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(torch.sort(idx, dim=-1).values, torch.arange(shape[1]).expand(shape))
    only, none = MF._sort_rows(x, indices=False)
    assert none is None
    torch.testing.assert_close(only, want, equal_nan=True, atol=0, rtol=0)


_FORK_X = torch.rand(4, 20000, generator=torch.Generator().manual_seed(24))


def _child_sorts(q) -> None:  # runs in a forked child; numpy checks only (torch's OpenMP is not fork-safe)
    vals, _ = MF._sort_rows(_FORK_X)
    q.put(bool((vals.numpy() == np.sort(_FORK_X.numpy(), axis=-1)).all()))


def test_sort_pool_survives_fork():
    """A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads: it must rebuild
    it instead of waiting forever on threads that do not exist."""
    import multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the parent and the child sort on a pool
    try:
        MF._sort_rows(_FORK_X)  # the parent's pool exists
        assert MF._SORT_POOL is not None and MF._SORT_POOL[0] == os.getpid()
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_sorts, args=(q,))
        p.start()
        p.join(60)
    finally:
        torch.set_num_threads(threads)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0 and q.get(timeout=5)


@pytest.mark.parametrize("levels", [None, 3, 1])
def test_sum_tied_pairs_both_paths_brute_force(levels):
    """Pairs of equal values per row, from the tie list (few ties) or the run starts (few runs)."""
    g = torch.Generator().manual_seed(23)
    x = torch.rand(5, 301, generator=g)
    if levels:
        x = torch.floor(x * levels)
    else:
        x[1, 10:20] = 0.5  # a few ties
        x[3, -2:] = 2.0  # a run that ends its sorted row ...
        x[4, :2] = -1.0  # ... next to one that starts the next sorted row
    sv = torch.sort(x, dim=-1).values
    tie = MF._flat_ties(sv)
    brute = [sum(c * (c - 1) // 2 for c in np.unique(r, return_counts=True)[1]) for r in x.numpy()]
    assert MF._sum_tied_pairs(tie, 5, 301).tolist() == brute


def test_check_finite_overflowing_sum_still_exact():
    """A sum that overflows to Inf is not taken as proof of a non-finite element (kendall_tau checks up front)."""
    from fragdefense.metrics._checks import check_finite

    big = torch.full((2, 40), 6e4, dtype=torch.float16)  # finite, but the float16 sum overflows
    big[1] = torch.arange(40, dtype=torch.float16)
    assert not torch.isfinite(big.sum())
    assert check_finite(big, "a") is big
    assert kendall_tau(big, big.flip(-1)).shape == (2,)
    big[0, 5] = float("nan")
    with pytest.raises(ValueError, match="`a` contains NaN"):
        kendall_tau(big, big)
    big[0, 5] = float("-inf")
    with pytest.raises(ValueError, match="`b` contains Inf"):
        kendall_tau(big.abs().clamp_max(1), big)


# ------------------------------------------------------------------------------------------------------------
# set metrics vs brute force
# ------------------------------------------------------------------------------------------------------------

H, W = 6, 7


def _small_maps(seed: int, levels: int | None) -> torch.Tensor:
    return _maps((10, H, W), seed, levels=levels)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("k", [1, 3, 10, 42])
def test_topk_intersection_brute_force(levels, k):
    a, b = _small_maps(20, levels), _small_maps(21, levels)
    out = topk_intersection(a, b, k)
    for i in range(a.shape[0]):
        xa, xb = a[i].flatten().tolist(), b[i].flatten().tolist()
        assert out[i].item() == pytest.approx(len(_bf_topk(xa, k) & _bf_topk(xb, k)) / k, abs=1e-12)


def _ref_topk_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable descending sort puts equal values in index order, so its first k are the top-k set
    with ties broken towards the lower index."""
    order = torch.sort(flat.double(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros(flat.shape, dtype=torch.bool).scatter_(1, order, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(6, 50), (4, 20000)])  # the second is above the threaded-path threshold
@pytest.mark.parametrize("k", [1, 7, 50])
def test_topk_mask_matches_stable_sort(dtype, shape, k):
    """Every path of ``_topk_mask`` (numpy selection on CPU float32/64, torch.topk otherwise; rows without and
    with surplus ties at the k-th value in one batch; threaded and not; non-contiguous input) selects the
    same set as a stable sort. The numpy path is also checked against the torch.topk path directly."""
    g = torch.Generator().manual_seed(shape[1] + k)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x[1] = torch.floor(x[1] * 3)  # heavy ties at the k-th value
    x[2] = 0.0  # a constant row: the first k pixels
    x[3, ::2] = -0.0  # both zeros compare equal
    x = x.to(dtype)
    expected = _ref_topk_mask(x, k)
    torch.testing.assert_close(MF._topk_mask(x, k), expected, atol=0, rtol=0)
    xt = x.t().contiguous().t()  # same values, column-major strides
    torch.testing.assert_close(MF._topk_mask(xt, k), expected, atol=0, rtol=0)
    kth_torch = torch.topk(x, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    torch.testing.assert_close(MF._kth_largest(x, k), kth_torch, atol=0, rtol=0)
    # the branch-free form that non-CPU devices run on the whole batch
    torch.testing.assert_close(MF._topk_mask_ties(x, kth_torch, k), expected, atol=0, rtol=0)


def test_topk_tie_break_is_lower_index():
    a = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    # T_2(a) = {1, 2} (lowest indices among the tied 2.0s); T_2(b) = {2, 3}
    assert topk_intersection(a, b, 2).item() == 0.5


@pytest.mark.parametrize("diverse", [False, True])
@pytest.mark.parametrize("mode", ["recall", "precision"])
@pytest.mark.parametrize(("k", "window"), [(1, 0), (3, 1), (5, 1), (2, 2), (4, 3), (6, 0), (1, 9)])
@pytest.mark.parametrize("levels", [None, 3])
def test_lens_brute_force(diverse, mode, k, window, levels):
    a, b = _small_maps(30 + k, levels), _small_maps(40 + window, levels)
    if diverse and any(_bf_topk_div(x.flatten().tolist(), k, window, H, W) is None for x in torch.cat([a, b])):
        with pytest.raises(ValueError, match="`k`"):
            lens_topk(a, b, k, window, mode=mode, diverse=True)
        return
    out = lens_topk(a, b, k, window, mode=mode, diverse=diverse)
    for i in range(a.shape[0]):
        xa, xb = a[i].flatten().tolist(), b[i].flatten().tolist()
        assert out[i].item() == pytest.approx(_bf_lens(xa, xb, k, window, H, W, mode, diverse), abs=1e-12)


def test_lens_borders_and_corners_no_wrap():
    # a's top pixel in the last column of row 0; b's in the first column of row 1: adjacent in flat index,
    # but 6 columns apart in the image -> a window of 1 must not connect them (no row wrap-around)
    a = torch.zeros(1, H, W, dtype=torch.float64)
    b = torch.zeros(1, H, W, dtype=torch.float64)
    a[0, 0, W - 1] = 1.0
    b[0, 1, 0] = 1.0
    assert lens_topk(a, b, 1, 1).item() == 0.0
    assert lens_topk(a, b, 1, 1, mode="precision").item() == 0.0
    # corner to diagonal neighbour: inside the clipped window
    b2 = torch.zeros_like(b)
    b2[0, 1, W - 2] = 1.0
    assert lens_topk(a, b2, 1, 1).item() == 1.0
    # bottom-right corner vs top-left corner: only a window covering the whole image connects them
    c = torch.zeros_like(a)
    c[0, H - 1, W - 1] = 1.0
    d = torch.zeros_like(a)
    d[0, 0, 0] = 1.0
    assert lens_topk(c, d, 1, W - 2).item() == 0.0
    assert lens_topk(c, d, 1, W - 1).item() == 1.0
    assert lens_topk(c, d, 1, 100).item() == 1.0


def test_lens_window0_equals_topk_intersection():
    a, b = _small_maps(50, None), _small_maps(51, None)
    for mode in ("recall", "precision"):
        torch.testing.assert_close(lens_topk(a, b, 7, 0, mode=mode), topk_intersection(a, b, 7))


@pytest.mark.parametrize("levels", [None, 2])
@pytest.mark.parametrize(("k", "window"), [(1, 1), (4, 1), (6, 1), (2, 2), (3, 0), (42, 0), (1, 50)])
def test_topk_div_brute_force(levels, k, window):
    a = _small_maps(60 + k, levels)
    expected = [_bf_topk_div(x.flatten().tolist(), k, window, H, W) for x in a]
    if any(e is None for e in expected):
        with pytest.raises(ValueError, match="`k`"):
            topk_div(a, k, window)
        return
    mask = topk_div(a, k, window)
    assert mask.dtype == torch.bool and mask.shape == a.shape
    for i, e in enumerate(expected):
        assert set(mask[i].flatten().nonzero().flatten().tolist()) == e


@pytest.mark.parametrize(("k", "window"), [(8, 1), (12, 2), (3, 4)])
def test_topk_div_candidate_pruning_exact_on_larger_maps(k, window):
    """(k-1)(2w+1)^2 + 1 < H*W here, so only the top candidates are searched: still equal to brute force."""
    a = _maps((6, 15, 16), 200 + k, levels=6)  # heavy ties
    mask = topk_div(a, k, window)
    for i in range(a.shape[0]):
        expected = _bf_topk_div(a[i].flatten().tolist(), k, window, 15, 16)
        assert set(mask[i].flatten().nonzero().flatten().tolist()) == expected


def test_topk_div_keeps_pixel0_and_second_pick():
    """Regression for the reference code's bugs: pixel 0 dropped, second pick skipped, row wrap."""
    a = torch.zeros(1, 4, 5, dtype=torch.float64)
    a[0, 0, 0] = 9.0  # flat index 0, the global maximum
    a[0, 0, 1] = 8.0  # excluded by pixel 0's window
    a[0, 1, 4] = 7.0  # second pick (flat index 9)
    a[0, 2, 0] = 6.0  # flat index 10 is next to 9 in flat order, but far in the image: third pick
    mask = topk_div(a, 3, 1)
    assert set(mask.flatten().nonzero().flatten().tolist()) == {0, 9, 10}


def test_topk_div_exhaustion_error_names_k():
    a = _maps((2, 3, 3), 70)
    with pytest.raises(ValueError, match=r"`k`=2 .*window=1.*`a`\[0\], `a`\[1\] ran out"):
        topk_div(a, 2, 1)  # one pick with w=1 covers the whole 3x3 image
    ramp = -torch.arange(12, dtype=torch.float64).view(1, 3, 4).repeat(2, 1, 1)  # picks 0, 2, 8, 10
    b = ramp.clone()
    b[1] = 0.0
    b[1, 1, 1] = 1.0  # first pick's window leaves only the last column: picks (1,1), (0,3), (2,3)
    assert topk_div(ramp, 4, 1).sum().item() == 8
    with pytest.raises(ValueError, match=r"`k`=4 .*: `b`\[1\] ran out of selectable pixels after \[3\] picks"):
        lens_topk(ramp, b, 4, 1, diverse=True)
    assert topk_div(a, 1, 1).sum().item() == 2


# ------------------------------------------------------------------------------------------------------------
# centre of mass, mask mass, pointing game
# ------------------------------------------------------------------------------------------------------------


def test_center_of_mass_matches_numpy():
    a = _maps((5, 6, 7), 80)
    out = center_of_mass(a)
    for i, x in enumerate(a.numpy()):
        rows, cols = np.indices(x.shape)
        exp = [(x * rows).sum() / x.sum(), (x * cols).sum() / x.sum()]
        np.testing.assert_allclose(out[i].numpy(), exp, atol=1e-10)
    b = _maps((5, 6, 7), 81)
    np.testing.assert_allclose(
        center_shift(a, b).numpy(), np.linalg.norm((out - center_of_mass(b)).numpy(), axis=1), atol=1e-10
    )


def test_center_of_mass_degenerate_is_image_centre():
    a = torch.zeros(2, 4, 7)
    a[1, 3, 6] = 2.0
    torch.testing.assert_close(center_of_mass(a), torch.tensor([[1.5, 3.0], [3.0, 6.0]]))
    assert center_shift(torch.zeros(3, 5, 5), torch.zeros(3, 5, 5)).tolist() == [0.0, 0.0, 0.0]


def test_center_of_mass_rejects_negative():
    with pytest.raises(ValueError, match=r"`a` must be non-negative.*abs"):
        center_of_mass(torch.tensor([[[1.0, -0.5]]]))
    with pytest.raises(ValueError, match="`b` must be non-negative"):
        center_shift(torch.ones(1, 2, 2), -torch.ones(1, 2, 2))


def test_mask_mass_and_pointing_game():
    a = _maps((8, 5, 6), 90)
    m = _maps((8, 5, 6), 91) > 0.5
    mm = mask_mass(a, m)
    np.testing.assert_allclose(mm.numpy(), (a * m).sum((1, 2)).numpy() / a.sum((1, 2)).numpy(), atol=1e-12)
    pg = pointing_game(a, m.to(torch.uint8))
    exp = [float(m[i].flatten()[a[i].flatten().argmax()]) for i in range(8)]
    assert pg.tolist() == exp
    # (B, D) maps are accepted too
    torch.testing.assert_close(mask_mass(a.flatten(1), m.flatten(1)), mm)


def test_mask_mass_pointing_game_degenerate():
    z = torch.zeros(2, 3, 3)
    full = torch.ones(2, 3, 3, dtype=torch.bool)
    assert mask_mass(z, full).tolist() == [0.0, 0.0]  # no mass -> 0.0
    assert pointing_game(z, full).tolist() == [0.0, 0.0]  # constant map points nowhere
    a = _maps((2, 3, 3), 92)
    assert mask_mass(a, ~full).tolist() == [0.0, 0.0]  # empty mask
    # ties at the maximum: the lowest flat index is the pointing location
    t = torch.tensor([[0.0, 3.0, 3.0]])
    assert pointing_game(t, torch.tensor([[False, True, False]])).item() == 1.0
    assert pointing_game(t, torch.tensor([[False, False, True]])).item() == 0.0


# ------------------------------------------------------------------------------------------------------------
# properties (hypothesis)
# ------------------------------------------------------------------------------------------------------------

_PAIR = st.integers(min_value=1, max_value=4).flatmap(
    lambda bsz: st.integers(min_value=2, max_value=30).flatmap(
        lambda d: st.tuples(
            *[
                hnp.arrays(
                    np.float64,
                    (bsz, d),
                    elements=st.one_of(
                        st.sampled_from([0.0, 1.0, 2.0, -1.0]),
                        st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32),
                    ),
                )
                for _ in range(2)
            ]
        )
    )
)


@settings(max_examples=50, deadline=None)
@given(_PAIR)
def test_property_rank_corr_symmetric_bounded_and_scipy(pair):
    a, b = (torch.from_numpy(x) for x in pair)
    for fn, ref in RANK_FNS:
        ab, ba = fn(a, b), fn(b, a)
        torch.testing.assert_close(ab, ba, atol=1e-12, rtol=0)
        assert bool(((ab >= -1) & (ab <= 1)).all())
        np.testing.assert_allclose(ab.numpy(), ref(a, b), atol=1e-6, rtol=0)
        assert fn(a, a).tolist() == [1.0] * a.shape[0]


@settings(max_examples=50, deadline=None)
@given(_PAIR, st.integers(min_value=1, max_value=30))
def test_property_topk_symmetric_bounded(pair, k):
    a, b = (torch.from_numpy(x) for x in pair)
    k = min(k, a.shape[1])
    ab = topk_intersection(a, b, k)
    torch.testing.assert_close(ab, topk_intersection(b, a, k), atol=0, rtol=0)
    assert bool(((ab >= 0) & (ab <= 1)).all())
    assert topk_intersection(a, a, k).tolist() == [1.0] * a.shape[0]


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(2, 6)),
        elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
    ),
    st.integers(0, 3),
    st.integers(1, 4),
)
def test_property_lens_bounds_identity_and_duality(x, window, k):
    a = torch.from_numpy(x)
    b = a.flip(-1).contiguous()
    k = min(k, a.shape[1] * a.shape[2])
    rec = lens_topk(a, b, k, window)
    prec_swapped = lens_topk(b, a, k, window, mode="precision")
    torch.testing.assert_close(rec, prec_swapped, atol=0, rtol=0)  # recall(a, b) == precision(b, a)
    assert bool(((rec >= 0) & (rec <= 1)).all())
    assert lens_topk(a, a, k, window).tolist() == [1.0] * a.shape[0]
    assert bool((rec >= topk_intersection(a, b, k)).all())  # a window can only add hits


_NONNEG_MAPS = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
    elements=st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0, 10, allow_nan=False, width=32)),
)


@settings(max_examples=50, deadline=None)
@given(_NONNEG_MAPS, st.data())
def test_property_center_shift_metric_properties_and_brute_force(x, data):
    """Non-negative, symmetric, 0 on identical maps, at most the image diagonal, and the centre of mass equal to
    the weighted mean of pixel coordinates (the image centre for an all-zero map)."""
    a = torch.from_numpy(x)
    b = torch.from_numpy(data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 10, width=32))))
    _, h, w = a.shape
    ab = center_shift(a, b)
    torch.testing.assert_close(ab, center_shift(b, a), atol=1e-12, rtol=0)
    assert bool((ab >= 0).all()) and bool((ab <= math.hypot(h - 1, w - 1) + 1e-9).all())
    assert center_shift(a, a).tolist() == [0.0] * a.shape[0]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i, m in enumerate(x):
        total = m.sum()
        ref = [(h - 1) / 2, (w - 1) / 2] if total == 0 else [(m * rows).sum() / total, (m * cols).sum() / total]
        np.testing.assert_allclose(center_of_mass(a)[i].numpy(), ref, atol=1e-9, rtol=0)


@settings(max_examples=50, deadline=None)
@given(_NONNEG_MAPS, st.data())
def test_property_mask_mass_and_pointing_game_bounds_and_brute_force(x, data):
    """mask_mass is in [0, 1], complementary masks add up to 1 (0 for an all-zero map), and both metrics equal a
    per-map Python reference (pointing game: first maximum, constant maps score 0)."""
    a = torch.from_numpy(x)
    mask = torch.from_numpy(data.draw(hnp.arrays(np.bool_, x.shape)))
    mm, mm_out = mask_mass(a, mask), mask_mass(a, ~mask)
    assert bool(((mm >= 0) & (mm <= 1)).all())
    pg = pointing_game(a, mask)
    assert set(pg.tolist()) <= {0.0, 1.0}
    for i, m in enumerate(x):
        total = m.sum()
        keep = mask[i].numpy()
        assert mm[i].item() == pytest.approx(0.0 if total == 0 else m[keep].sum() / total, abs=1e-12)
        assert mm[i].item() + mm_out[i].item() == pytest.approx(0.0 if total == 0 else 1.0, abs=1e-12)
        flat = m.reshape(-1)
        hit = 0.0 if flat.min() == flat.max() else float(keep.reshape(-1)[int(np.argmax(flat))])
        assert pg[i].item() == hit


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------

_GOOD = torch.rand(2, 4, 5)


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: spearman(a, b),
        lambda a, b: kendall_tau(a, b),
        lambda a, b: topk_intersection(a, b, 3),
        lambda a, b: lens_topk(a, b, 3, 1),
        lambda a, b: center_shift(a, b),
    ],
    ids=["spearman", "kendall", "topk", "lens", "center_shift"],
)
def test_pair_input_errors(call):
    with pytest.raises(ValueError, match=r"`a` must have shape"):
        call(torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match=r"`b` must have shape"):
        call(_GOOD, torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"`a` and `b` must have the same shape.*\(2, 4, 5\).*\(2, 5, 4\)"):
        call(_GOOD, torch.rand(2, 5, 4))
    with pytest.raises(TypeError, match=r"`a` must have a floating dtype"):
        call(torch.ones(2, 4, 5, dtype=torch.int64), _GOOD)
    with pytest.raises(TypeError, match=r"`b` must be a torch.Tensor"):
        call(_GOOD, _GOOD.numpy())
    bad = _GOOD.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`b` contains NaN"):
        call(_GOOD, bad)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"`a` contains Inf"):
        call(bad, _GOOD)
    with pytest.raises(ValueError, match=r"`a` must have at least one element"):
        call(torch.rand(2, 0, 3), torch.rand(2, 0, 3))


@pytest.mark.parametrize("k", [0, -1, 21])
def test_k_out_of_range(k):
    for call in (
        lambda: topk_intersection(_GOOD, _GOOD, k),
        lambda: lens_topk(_GOOD, _GOOD, k, 1),
        lambda: lens_topk(_GOOD, _GOOD, k, 1, diverse=True),
        lambda: topk_div(_GOOD, k, 1),
    ):
        with pytest.raises(ValueError, match=r"`k` must be >= 1 and <= 20"):
            call()
    with pytest.raises(TypeError, match="`k` must be an int"):
        topk_intersection(_GOOD, _GOOD, 2.0)


def test_spatial_and_option_errors():
    flat = torch.rand(2, 20)
    with pytest.raises(ValueError, match=r"`a` must have shape \(B, H, W\)"):
        lens_topk(flat, flat, 3, 1)
    with pytest.raises(ValueError, match=r"`a` must have shape \(B, H, W\)"):
        center_of_mass(flat)
    with pytest.raises(ValueError, match=r"`a` must have shape \(B, H, W\)"):
        topk_div(flat, 2, 1)
    with pytest.raises(ValueError, match="`window` must be >= 0"):
        lens_topk(_GOOD, _GOOD, 3, -1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        lens_topk(_GOOD, _GOOD, 3, 1, mode="f1")
    with pytest.raises(TypeError, match="`diverse` must be a bool"):
        lens_topk(_GOOD, _GOOD, 3, 1, diverse=1)


def test_mask_errors():
    with pytest.raises(
        ValueError, match=r"`mask` must have the same shape as `a`.*\(2, 5, 4\) for `mask` and \(2, 4, 5\) for `a`"
    ):
        mask_mass(_GOOD, torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must be binary"):
        pointing_game(_GOOD, torch.full((2, 4, 5), 0.5))
    with pytest.raises(TypeError, match="`mask` must be a torch.Tensor"):
        mask_mass(_GOOD, np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="`a` must be non-negative"):
        mask_mass(-_GOOD, torch.ones(2, 4, 5, dtype=torch.bool))
    bad = _GOOD.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`a` contains NaN"):
        pointing_game(bad, torch.ones(2, 4, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------
# misc: empty batch, devices, doctests, import hygiene
# ------------------------------------------------------------------------------------------------------------


def test_empty_batch():
    z = torch.rand(0, 3, 4)
    m = torch.zeros(0, 3, 4, dtype=torch.bool)
    for out in (
        spearman(z, z),
        kendall_tau(z, z),
        topk_intersection(z, z, 2),
        lens_topk(z, z, 2, 1, diverse=True),
        center_shift(z, z),
        mask_mass(z, m),
        pointing_game(z, m),
    ):
        assert out.shape == (0,)
    assert center_of_mass(z).shape == (0, 2)
    assert topk_div(z, 2, 1).shape == (0, 3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU in CI
    a, b = _maps((4, 9, 11), 100, levels=5), _maps((4, 9, 11), 101)
    for fn in (spearman, kendall_tau, lambda x, y: lens_topk(x, y, 5, 1, diverse=True)):
        torch.testing.assert_close(fn(a.cuda(), b.cuda()).cpu(), fn(a, b))


def test_doctests_run():
    res = doctest.testmod(MF, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 9 and res.failed == 0


def test_functional_imports_only_torch():
    code = (
        "import sys, fragdefense.metrics.functional; "
        "bad = [m for m in ('torchmetrics', 'lightning', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_known_values():
    tau = kendall_tau(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[1.0, 3, 2, 4]]))
    assert math.isclose(tau.item(), 2 / 3, rel_tol=1e-7)
    assert kendall_tau(torch.tensor([[1.0, 2, 3]]), torch.tensor([[3.0, 2, 1]])).item() == -1.0
    assert spearman(torch.tensor([[1.0, 2, 3]]), torch.tensor([[1.0, 3, 2]])).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------------
# Kendall tau on CPU: numpy counting (block-decomposed inversion count, packed-key sorts)
# ------------------------------------------------------------------------------------------------------------


def _bf_inversions(rows: np.ndarray) -> list[int]:
    return [int(np.triu(r[:, None] > r[None, :], 1).sum()) for r in rows]


@pytest.mark.parametrize("d", [1, 2, 3, 15, 16, 17, 100, 255, 256, 257, 600, 1500])
def test_np_inversions_perm_brute_force(d):
    """Every recursion shape: brute force only (d <= 16), one level with brute-force chunks (d <= 256), two
    levels with sorted chunks, padded rows; random, identity and reversed permutations."""
    g = np.random.default_rng(d)
    p = np.stack([g.permutation(d), np.arange(d), np.arange(d)[::-1], g.permutation(d)]).astype(np.int32)
    pi = np.argsort(p, axis=1).astype(np.int32)
    out = MF._np_inversions_perm(p.reshape(4, 1, d), pi.reshape(4, 1, d))
    assert out.tolist() == _bf_inversions(p)
    assert out[1] == 0 and out[2] == d * (d - 1) // 2


def test_np_inversions_perm_large_against_torch_radix():
    """224 x 224 permutations (two levels, chunks of 256 then 16) against the independent torch radix count."""
    g = torch.Generator().manual_seed(31)
    d = 224 * 224
    p = torch.stack([torch.randperm(d, generator=g) for _ in range(3)])
    p[2] = torch.cat([torch.arange(d // 2), d // 2 + torch.randperm(d - d // 2, generator=g)])  # sorted prefix
    pn = p.numpy().astype(np.int32)
    pin = np.argsort(pn, axis=1).astype(np.int32)
    out = MF._np_inversions_perm(pn.reshape(3, 1, d), pin.reshape(3, 1, d))
    assert out.tolist() == MF._count_inversions(p).tolist()


@pytest.mark.parametrize("levels", [None, 3, 40])
def test_np_kendall_counts_brute_force(levels):
    """(n1, n2, n3, n_d) from the packed-key sorts against pair enumeration, with ties in a, in b and in both."""
    g = torch.Generator().manual_seed(32 + (levels or 0))
    a, b = _maps((5, 70), 33, levels), _maps((5, 70), 34, levels)
    b[1] = a[1]
    b[2] = -a[2]
    counts = MF._kendall_counts_cpu(a, b).tolist()
    for i in range(5):
        x, y = a[i].numpy(), b[i].numpy()
        dx, dy = x[:, None] - x[None, :], y[:, None] - y[None, :]
        up = np.triu(np.ones((70, 70), bool), 1)
        n1, n2 = int((up & (dx == 0)).sum()), int((up & (dy == 0)).sum())
        n3 = int((up & (dx == 0) & (dy == 0)).sum())
        n_d = int((up & (dx * dy < 0)).sum())
        assert counts[i] == [n1, n2, n3, n_d]
    del g


def test_np_rank_key_exact_when_values_differ_in_low_bits():
    """Dense ranks of float64 rows whose values differ only in the bits the packed sort drops (re-sorted
    exactly), with ties and both signed zeros, against scipy's dense ranks."""
    g = np.random.default_rng(35)
    d = 3000
    x = np.empty((3, d))
    x[0] = 1.0 + g.permutation(d) * 2.0**-52  # all differences below the index bits
    x[1] = g.integers(-5, 5, d) * 0.5
    x[1, :10] = -0.0
    x[2] = g.random(d)
    assert bool((x[1] == 0).any())
    key = MF._np_rank_key(x)
    for i in range(3):
        assert key[i].tolist() == scipy.stats.rankdata(x[i], method="dense").astype(int).tolist()


def test_kendall_float64_low_bit_differences_match_scipy():
    g = torch.Generator().manual_seed(36)
    a = 1.0 + torch.randperm(5000, generator=g).double().view(2, 2500) * 2.0**-52
    b = a + torch.randn(2, 2500, generator=g, dtype=torch.float64) * 2.0**-48
    np.testing.assert_allclose(kendall_tau(a, b).numpy(), _ref_kendall(a, b), atol=1e-12, rtol=0)


def test_kendall_threaded_rows_match_single_thread():
    """Rows split over the row-sort pool (2 threads) give the same values as one thread, and scipy's."""
    a, b = _maps((6, 90, 90), 37), _maps((6, 90, 90), 38, levels=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = kendall_tau(a, b)
        torch.set_num_threads(1)
        one = kendall_tau(a, b)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, atol=0, rtol=0)
    np.testing.assert_allclose(one.numpy(), _ref_kendall(a, b), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# top-k-div: the candidate scan against the previous greedy implementation and brute force
# ------------------------------------------------------------------------------------------------------------


def _ref_topk_div_greedy(a: torch.Tensor, k: int, window: int) -> torch.Tensor:
    """The previous implementation (k greedy steps, each an arg-max over the candidates and a scatter of the
    window), copied as a reference; returns the mask and -inf-free picks only (no error handling)."""
    bsz, h, w = a.shape
    d = h * w
    win = min(window, max(h, w) - 1)
    flat = a.reshape(bsz, d)
    n_win = (2 * win + 1) ** 2
    m = min(d, (k - 1) * n_win + 1)
    vals = torch.empty(bsz, m + 1, dtype=a.dtype)
    vals[:, m] = -math.inf
    if m < d:
        cand = _ref_topk_mask(flat, m).nonzero()[:, 1].view(bsz, m)
        slot = torch.full((bsz, d + 1), m, dtype=torch.long)
        slot.scatter_(1, cand, torch.arange(m).expand(bsz, m))
        vals[:, :m] = flat.gather(1, cand)
    else:
        cand = slot = None
        vals[:, :m] = flat
    body = vals[:, :m]
    off = torch.arange(-win, win + 1)
    dr, dc = off.repeat_interleave(off.numel()), off.repeat(off.numel())
    selected = torch.zeros(bsz, d + 1, dtype=torch.bool)
    for _ in range(k):
        mx, j = body.max(dim=-1)
        pix = j if cand is None else cand.gather(1, j.unsqueeze(1)).squeeze(1)
        r, c = (pix // w).unsqueeze(-1) + dr, (pix % w).unsqueeze(-1) + dc
        nbr = torch.where((r >= 0) & (r < h) & (c >= 0) & (c < w), r * w + c, d)
        vals.scatter_(1, nbr if slot is None else slot.gather(1, nbr), -math.inf)
        selected.scatter_(1, torch.where(torch.isfinite(mx), pix, d).unsqueeze(1), True)
    return selected[:, :d].reshape(bsz, h, w)


@pytest.mark.parametrize("kind", ["random", "ties", "smooth", "constant", "float32"])
@pytest.mark.parametrize(("shape", "k", "window"), [((4, 40, 37), 60, 1), ((3, 64, 64), 200, 1), ((3, 50, 50), 30, 3)])
def test_topk_div_scan_matches_previous_greedy(kind, shape, k, window):
    """Random, tied (quantised), smooth and constant maps, float64 (stable torch.sort order) and float32
    (packed numpy keys): the same masks as the previous k-step greedy; k large enough that the candidate
    list has to grow past its first 2k + 64."""
    a = _maps(shape, 40 + k, levels={"ties": 4, "constant": 1}.get(kind))
    if kind == "smooth":
        a = torch.nn.functional.avg_pool2d(a.unsqueeze(1), 7, 1, 3).squeeze(1)
    if kind == "float32":
        a = a.float()
    expected = _ref_topk_div_greedy(a, k, window)
    assert bool((expected.sum(dim=(1, 2)) == k).all())  # every map reaches k picks here
    torch.testing.assert_close(topk_div(a, k, window), expected, atol=0, rtol=0)


def test_topk_div_table_fallback_same_masks(monkeypatch):
    a = _maps((3, 30, 30), 45, levels=5)
    fast = topk_div(a, 40, 1)
    monkeypatch.setattr(MF, "_DIV_SLOT_TABLE_MAX", 0)  # the plain greedy for every call
    torch.testing.assert_close(topk_div(a, 40, 1), fast, atol=0, rtol=0)
    torch.testing.assert_close(fast, _ref_topk_div_greedy(a, 40, 1), atol=0, rtol=0)


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize(("k", "window"), [(5, 1), (9, 2), (12, 1), (3, 3)])
def test_topk_div_scan_brute_force_small(levels, k, window):
    a = _maps((5, 9, 11), 50 + k, levels=levels)
    expected = [_bf_topk_div(x.flatten().tolist(), k, window, 9, 11) for x in a]
    if any(e is None for e in expected):
        with pytest.raises(ValueError, match="`k`"):
            topk_div(a, k, window)
        return
    mask = topk_div(a, k, window)
    for i, e in enumerate(expected):
        assert set(mask[i].flatten().nonzero().flatten().tolist()) == e


def test_torch_forms_of_kendall_and_topk_div_on_cpu(monkeypatch):
    """The device-agnostic torch forms (radix inversion count, torch scan loop, stable torch.sort order), run
    on CPU tensors: same Kendall values as scipy and the same top-k-div masks as the previous greedy."""
    a, b = _maps((4, 30, 30), 60, levels=6), _maps((4, 30, 30), 61)
    monkeypatch.setattr(MF, "_NUMPY_CPU_PATHS", False)
    np.testing.assert_allclose(kendall_tau(a, b).numpy(), _ref_kendall(a, b), atol=1e-12, rtol=0)
    for x in (a, b.float()):
        torch.testing.assert_close(topk_div(x, 50, 1), _ref_topk_div_greedy(x, 50, 1), atol=0, rtol=0)
