r"""Per-map similarity metrics between attribution (saliency) maps: the functional core.

Every function takes a batch of maps ``(B, H, W)`` or ``(B, D)`` and returns one value per sample, shape
``(B,)`` (``(B, 2)`` for :func:`center_of_mass`), in the dtype of the first map argument. Everything is batched
over ``B`` with tensor ops (no Python loop over samples), runs on the inputs' device, and imports only torch
(and numpy, whose SIMD sort the rank metrics use for CPU tensors).

Conventions shared by all functions
-----------------------------------
* Maps are flattened row-major: pixel ``(i, j)`` of an ``H x W`` map has flat index ``i * W + j``.
* **Top-k sets** ``T_k(a)``: the ``k`` largest entries of ``a``; ties at the k-th value are broken in favour of
  the *lower flat index* (deterministic, unlike :func:`torch.topk`).
* **Windows** ``N_w(T)``: the union of the ``(2w+1) x (2w+1)`` squares centred on the pixels of ``T``,
  clipped at the image borders (never wrapping from one row to the next).
* **Invalid input** raises instead of returning NaN: non-tensor / int dtype -> ``TypeError``; wrong ndim,
  NaN or Inf, shape mismatch, ``k`` outside ``[1, D]`` -> ``ValueError`` naming the argument.
* **Degenerate input** has a defined answer, documented per function (e.g. rank correlation with a
  constant map).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fragdefense.metrics._checks import (
    check_finite,
    check_mask,
    check_nonneg,
    check_one_map,
    check_two_maps,
)
from fragdefense.utils.checks import check_int_in_range

__all__ = [
    "topk_intersection",
    "spearman",
    "kendall_tau",
    "center_of_mass",
    "center_shift",
    "lens_topk",
    "topk_div",
    "mask_mass",
    "pointing_game",
]

_LENS_MODES = ("recall", "precision")


# ----------------------------------------------------------------------------------------------------------
# private helpers
# ----------------------------------------------------------------------------------------------------------
def _acc_dtype(device: torch.device) -> torch.dtype:
    """Float dtype for exact-ish accumulation: float64 except on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _flat(a: Tensor) -> Tensor:
    return a.reshape(a.shape[0], _numel(a))


def _numel(a: Tensor) -> int:
    """Elements per map, ``D`` (valid for an empty batch too)."""
    return math.prod(a.shape[1:])


def _check_k(k: int, d: int) -> int:
    return check_int_in_range(k, "k", 1, d)


def _check_window(window: int) -> int:
    return check_int_in_range(window, "window", 0)


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    """Boolean ``(B, D)`` mask of the top-k entries per row, ties broken towards the lower index.

    The mask is ``flat >= kth`` (``kth``: the k-th largest value of the row) wherever that selects exactly ``k``
    entries; rows with more than one entry equal to ``kth`` keep only the first ones needed. On CPU the k-th
    value comes from numpy's SIMD introselect (``np.partition``, see ``_kth_largest``) and only the rows with
    surplus ties pay for the cumulative count; other devices run the branch-free form (no host sync).
    """
    kth = _kth_largest(flat, k)  # (B, 1)
    if flat.device.type == "cpu":
        ge = flat >= kth
        over = ge.sum(dim=-1, dtype=torch.int32) > k
        if not bool(over.any()):
            return ge
        rows = over.nonzero().squeeze(1)
        ge[rows] = _topk_mask_ties(flat[rows], kth[rows], k)
        return ge
    return _topk_mask_ties(flat, kth, k)


def _topk_mask_ties(flat: Tensor, kth: Tensor, k: int) -> Tensor:
    """Top-k mask given the k-th largest value ``kth`` ``(B, 1)``: every entry above it, then the first entries
    equal to it until ``k`` are selected."""
    gt = flat > kth
    eq = flat == kth
    n_eq_needed = k - gt.sum(dim=-1, keepdim=True, dtype=torch.int32)  # >= 1: fewer than k entries exceed kth
    return gt | (eq & (eq.cumsum(dim=-1, dtype=torch.int32) <= n_eq_needed))


def _kth_largest(flat: Tensor, k: int) -> Tensor:
    """The k-th largest value of every row of a 2-D tensor, shape ``(B, 1)``.

    CPU float32/float64: ``np.partition`` (introselect; numpy 2 vectorises it with AVX-512 where available),
    zero-copy on the tensor's memory and split over the row-sort thread pool; 3.4x faster than ``torch.topk``
    on 32 rows of 224 x 224 on this machine. Otherwise ``torch.topk(..., sorted=False)`` and a row minimum.
    Both order NaN above every number.
    """
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or flat.dim() != 2:
        return torch.topk(flat, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    xn = flat.detach().numpy()
    d = xn.shape[1]
    out = np.empty((xn.shape[0], 1), dtype=xn.dtype)

    def work(rows: slice) -> None:
        out[rows, 0] = np.partition(xn[rows], d - k, axis=-1)[:, d - k]

    _run_rows(work, xn.shape[0], flat.numel())
    return torch.from_numpy(out)


def _run_rows(work: Callable[[slice], None], n_rows: int, numel: int) -> None:
    """Call ``work`` on row slices covering ``0..n_rows``: on the calling thread for small inputs, else split
    over ``torch.get_num_threads()`` threads of the row-sort pool (the numpy kernels release the GIL)."""
    workers = min(torch.get_num_threads(), n_rows)
    if workers < 2 or numel < _SORT_PARALLEL_MIN:
        work(slice(None))
        return
    bounds = [n_rows * i // workers for i in range(workers + 1)]
    pool = _sort_pool(workers)
    for f in [pool.submit(work, slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()


_LITTLE_ENDIAN = sys.byteorder == "little"
_NUMPY_SORT_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)
_SORT_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_SORT_POOL_LOCK = threading.Lock()
_SORT_PARALLEL_MIN = 1 << 15  # elements; smaller inputs sort on the calling thread


def _sort_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool for row sorts, rebuilt after a fork (a forked child has the object but not the threads)
    or when torch's thread count changed."""
    global _SORT_POOL
    pid = os.getpid()
    with _SORT_POOL_LOCK:
        if _SORT_POOL is None or _SORT_POOL[0] != pid or _SORT_POOL[1] != workers:
            if _SORT_POOL is not None and _SORT_POOL[0] == pid:
                _SORT_POOL[2].shutdown(wait=False)
            _SORT_POOL = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix="fragdefense-sort"))
        return _SORT_POOL[2]


def _sort_rows(x: Tensor, indices: bool = True) -> tuple[Tensor, Tensor | None]:
    """Ascending sort of every row of a 2-D tensor: ``(values, int64 indices)``, like ``torch.sort(x, -1)``;
    ``indices=False`` returns ``(values, None)``, which is cheaper.

    The order among equal values is unspecified; NaN sorts last, ``-inf`` first. On CPU the rows are sorted by
    numpy's SIMD quicksort (``np.argsort`` / ``np.sort``, zero-copy on the tensor's memory), split across
    ``torch.get_num_threads()`` threads (numpy releases the GIL while sorting): on this machine (2 threads,
    32 rows of 224 x 224 float32) 63 ms for ``torch.sort`` against 13 ms for the arg-sort and 3 ms for
    values only. Other devices and dtypes use ``torch.sort``.
    """
    if x.device.type != "cpu" or x.dtype not in _NUMPY_SORT_DTYPES or x.dim() != 2:
        v, i = torch.sort(x, dim=-1)
        return v, (i if indices else None)
    xn = x.detach().numpy()
    idx = np.empty(xn.shape, dtype=np.int64) if indices else None
    val = np.empty_like(xn)

    def work(rows: slice) -> None:
        if idx is None:
            val[rows] = np.sort(xn[rows], axis=-1)
        else:
            idx[rows] = np.argsort(xn[rows], axis=-1)
            val[rows] = np.take_along_axis(xn[rows], idx[rows], axis=-1)

    _run_rows(work, xn.shape[0], x.numel())
    return torch.from_numpy(val), (None if idx is None else torch.from_numpy(idx))


def _tied_runs_sparse(tie: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Flat positions in ``(R, D)`` and values ``s + e + 1 - D`` of every element of a tied run, from the
    ``(R, D - 1)`` bool ``tie`` (``tie[:, j]``: sorted positions ``j`` and ``j + 1`` are equal). Work is
    proportional to the number of ties, not to ``R * D``."""
    idx = tie.reshape(-1).nonzero().squeeze(1)  # j of every tied neighbour pair, row-major
    row = idx // (d - 1)
    p = idx - row * (d - 1) + 1  # the later element of the pair; its run contains p - 1
    first = torch.ones_like(idx, dtype=torch.bool)  # first pair of a run: not the continuation of the previous
    first[1:] = (idx[1:] != idx[:-1] + 1) | (row[1:] != row[:-1])
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    run = first.cumsum(0) - 1
    p_first = p[first]
    val = (p_first + p[last] - d).to(torch.int32)  # run s..e with s = p_first - 1, e = p_last
    return torch.cat([row * d + p, row[first] * d + p_first - 1]), torch.cat([val[run], val])


def _twice_centred_rank_sorted(sv: Tensor, sparse_fraction: float = 0.125, runs_fraction: float = 0.25) -> Tensor:
    """``2 * r - (D + 1)`` for the 1-based average ("fractional") rank ``r`` of each element of the sorted
    rows ``sv`` ``(B, D)``, as exact int32.

    A run of ties at sorted positions ``s..e`` has ``r = (s + e) / 2 + 1``, so the result is ``s + e + 1 - D``;
    untied elements get ``2 * pos + 1 - D``. Only rows that contain ties are touched. When at most
    ``sparse_fraction`` of their neighbour pairs tie (continuous maps: a few float collisions) the runs are
    resolved from the list of tied pairs, at a cost proportional to the ties. When the runs are few (at most
    ``runs_fraction`` of the elements start one: quantised maps) each run's value is computed once from the
    list of run starts and spread over the run by a cumulative sum along the row. In between, ``s`` is a
    cumulative max of run-start positions and ``e`` the same on the reversed rows (as ``e_rev = D - 1 - e``),
    giving ``s - e_rev``.
    """
    bsz, d = sv.shape
    ar = torch.arange(d, dtype=torch.int32, device=sv.device)
    base = 2 * ar + (1 - d)
    if d < 2:
        return base.expand(bsz, d)
    tie = torch.eq(sv[:, 1:], sv[:, :-1])
    rows = tie.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:  # no ties anywhere in the batch: ranks are positions
        return base.expand(bsz, d)
    all_rows = rows.numel() == bsz
    t = tie if all_rows else tie[rows]
    n_tie = int(t.sum(dtype=torch.int32 if t.numel() < 2**31 else torch.long))
    if n_tie <= sparse_fraction * t.numel():
        out = base.expand(bsz, d).clone()
        pos, val = _tied_runs_sparse(t, d)
        if all_rows:
            out.view(-1)[pos] = val
        else:
            sub = out[rows]
            sub.view(-1)[pos] = val
            out[rows] = sub
        return out
    new = torch.ones(t.shape[0], d + 1, dtype=torch.bool, device=sv.device)  # new[:, i]: a run starts at i
    torch.logical_not(t, out=new[:, 1:d])
    n_el = t.shape[0] * d
    if n_el - n_tie <= runs_fraction * n_el:  # few runs: one value per run, repeated over its length
        starts = new[:, :d].reshape(-1).nonzero().squeeze(1)  # flat; every row starts a run
        length = torch.diff(starts, append=starts.new_full((1,), n_el))
        s_pos = starts % d
        val = (2 * s_pos + length - d).to(torch.int32)  # s + e + 1 - D with e = s + length - 1
        # each run start holds the step from the previous run's value (the value itself at a row start); a
        # cumulative sum along the rows spreads every run's value over the run
        step = val.clone()
        step[1:] -= torch.where(s_pos[1:] == 0, 0, val[:-1])
        ranks = torch.zeros(t.shape[0], d, dtype=torch.int32, device=sv.device)
        ranks.view(-1)[starts] = step
        ranks = ranks.cumsum_(dim=1)
        if all_rows:
            return ranks
        out = base.expand(bsz, d).clone()
        out[rows] = ranks
        return out
    start = (new[:, :d] * ar).cummax(dim=-1).values
    end_rev = (new[:, 1:].flip(-1) * ar).cummax(dim=-1).values.flip(-1)  # new[:, i+1]: a run ends at i
    if all_rows:
        return start - end_rev
    out = base.expand(bsz, d).clone()
    out[rows] = start - end_rev
    return out


def _degenerate_corr(num: Tensor, var_a: Tensor, var_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``num / sqrt(var_a * var_b)`` from exact integer statistics, clipped to [-1, 1].

    1.0 if both variances are 0 and 0.0 if exactly one is (constant maps); exactly +-1 when ``|num|`` equals
    both variances (identical / reversed rankings), so rounding never yields 0.9999999999999998.
    """
    acc = _acc_dtype(num.device)
    num, var_a, var_b = num.to(acc), var_a.to(acc), var_b.to(acc)
    a0, b0 = var_a == 0, var_b == 0
    denom = torch.where(a0 | b0, torch.ones_like(var_a), var_a.sqrt() * var_b.sqrt())
    rho = (num / denom).clamp(-1.0, 1.0)
    # inputs are exact integers: |num| == var_a == var_b means perfect (anti-)agreement -> exactly +-1
    rho = torch.where((num == var_a) & (num == var_b), torch.ones_like(rho), rho)
    rho = torch.where((-num == var_a) & (-num == var_b), -torch.ones_like(rho), rho)
    rho = torch.where(a0 & b0, torch.ones_like(rho), torch.where(a0 ^ b0, torch.zeros_like(rho), rho))
    return rho.to(out_dtype)


def _count_inversions(y: Tensor) -> Tensor:
    """Number of pairs ``i < j`` with ``y[:, i] > y[:, j]`` per row, as int64 ``(B,)``.

    ``y`` is an integer ``(B, D)`` tensor with values in ``[0, D)`` (dense ranks). Vectorised MSD radix sort,
    O(D log D) per row: at bit level ``l`` (high to low) each row is kept stably ordered by its group
    ``g = y >> (l + 1)``; inside a group every element whose bit ``l`` is 0 forms an inversion with each
    earlier element of the group whose bit ``l`` is 1 (they agree on all higher bits, so the earlier one is
    larger). Every inverted pair is counted exactly once, at the highest bit where its two values differ, and
    pairs of equal values are never counted.

    With ``c`` the inclusive running count of ones, the level's count is
    ``sum_{zeros} (c_i - OB(g_i)) = sum_i c_i - n1 (n1 + 1) / 2 - sum_g zeros(g) OB(g)`` (``OB(g)``: ones in
    earlier groups, from the value histogram), so it costs one cumulative sum and one sum. Then the row is
    stably partitioned by bit ``l``: a zero moves to ``i - c_i + OB(g)``, a one to
    ``start(g) + zeros(g) - OB(g) + c_i - 1``, both read from one per-(group, bit) table.

    Every full-size intermediate lives in a buffer allocated once and written with ``out=`` / in place: on
    CPU a fresh multi-megabyte tensor per operation costs page faults that took a third of the time.
    """
    bsz, d = y.shape
    dev = y.device
    inv = torch.zeros(bsz, dtype=torch.long, device=dev)
    if d < 2 or bsz == 0:
        return inv
    cur = y.to(torch.int32, memory_format=torch.contiguous_format, copy=True)  # the levels overwrite it
    n_bits = int(cur.max()).bit_length()
    if n_bits == 0:
        return inv
    n_val = 1 << n_bits
    # five int32 work buffers and one int64 index buffer, reused by every level (mixed-dtype elementwise ops
    # and int32 indices both take slow, allocating paths in torch; each fresh buffer costs page faults)
    idx64 = cur.long()
    hist = torch.zeros(bsz, n_val, dtype=torch.int32, device=dev)
    hist.scatter_add_(1, idx64, torch.ones(1, 1, dtype=torch.int32, device=dev).expand_as(cur))
    pos = torch.arange(d, dtype=torch.int32, device=dev)
    sum_dtype = torch.int32 if d * (d + 1) // 2 < 2**31 else torch.long  # sum_i c_i <= D (D + 1) / 2
    off_dtype = torch.int32 if d * d // 4 < 2**31 else torch.long  # sum_g zeros(g) OB(g) <= n0 n1 <= D^2 / 4
    counts = [hist]  # counts[l][:, k]: values v with v >> l == k, i.e. by (group, bit) at level l
    for _ in range(n_bits - 1):
        counts.append(counts[-1][:, 0::2] + counts[-1][:, 1::2])
    bit, c, zc, nxt = (torch.empty_like(cur) for _ in range(4))
    for lvl in range(n_bits - 1, -1, -1):
        cnt = counts[lvl]
        zeros, ones = cnt[:, 0::2], cnt[:, 1::2]
        ones_before = ones.cumsum(1, dtype=torch.int32) - ones  # OB(g)
        torch.bitwise_right_shift(cur, lvl, out=bit)  # key = 2 g + bit
        if lvl:
            idx64.copy_(bit)
        bit.bitwise_and_(1)
        torch.cumsum(bit, 1, dtype=torch.int32, out=c)
        n1 = c[:, -1].long()
        inv += c.sum(1, dtype=sum_dtype) - n1 * (n1 + 1) // 2 - (zeros.to(off_dtype) * ones_before).sum(1)
        if lvl == 0:
            break
        tot = zeros + ones
        start = tot.cumsum(1, dtype=torch.int32) - tot
        table = torch.stack([ones_before, start + zeros - ones_before - 1], dim=2).view(bsz, -1)
        torch.sub(pos, c, out=zc)  # zeros: i - c_i
        c.sub_(zc)
        zc.addcmul_(bit, c)  # ones: c_i (where(bit, c, zc) without a slow where)
        torch.gather(table, 1, idx64, out=bit)
        idx64.copy_(zc.add_(bit))
        nxt.scatter_(1, idx64, cur)
        cur, nxt = nxt, cur
    return inv


# ----------------------------------------------------------------------------------------------------------
# Kendall tau on CPU: numpy counting (sorts of packed int keys and an O(D log log D) inversion count)
# ----------------------------------------------------------------------------------------------------------
_NUMPY_CPU_PATHS = True  # kendall_tau / topk_div run their numpy forms on CPU (tests switch it off)
_INV_BRUTE_MAX = 16  # sequences up to this length are counted pair by pair
_KENDALL_GROUP_ELEMENTS = 1 << 16  # maps counted together per call (cache-sized working set)


def _np_inversions_brute(x: np.ndarray) -> np.ndarray:
    """Strict inversions of short sequences, summed per map: ``x`` is ``(R, L, K)`` C-contiguous, holding ``K``
    sequences of length ``L`` per map (element ``i`` of sequence ``k`` at ``[:, i, k]``, so every comparison
    runs over a contiguous slab). Returns int64 ``(R,)``."""
    r, length, k = x.shape
    acc = np.zeros((r, length, k), np.uint8)  # acc[:, j, k]: earlier elements of sequence k greater than element j
    tmp = np.empty((r, length, k), np.bool_)
    for step in range(1, length):
        t, a = tmp[:, step:], acc[:, step:]
        np.greater(x[:, :-step], x[:, step:], out=t)
        np.add(a, t.view(np.uint8), out=a)
    return acc.reshape(r, -1).sum(axis=1, dtype=np.int64)


def _np_cross_pairs(p: np.ndarray, bits: int, nb: int) -> np.ndarray:
    """Inverted pairs of the permutation rows ``p`` ``(R, N, nb * s)`` (``s = 2**bits``) whose positions lie in
    different blocks of ``s`` *and* whose values lie in different buckets of ``s``, summed per map.

    With ``h[p, v]`` the number of elements in position block ``p`` and value bucket ``v``, such a pair is an
    element of ``(p, v)`` and one of ``(p', v')`` with ``p < p'`` and ``v > v'``; the count is
    ``sum_{p', v} a[p', v] g[p', v]`` with ``a`` the exclusive running sum of ``h`` over ``p`` and ``g`` the
    exclusive running sum over ``v``: two passes over the ``nb x nb`` histogram instead of over the pairs."""
    r, n_rows, m = p.shape
    nr = r * n_rows
    ids = np.empty((nr, nb, 1 << bits), np.int64)
    np.right_shift(p.reshape(nr, nb, 1 << bits), bits, out=ids)  # value bucket v
    ids += np.arange(0, nb * nb, nb, dtype=np.int64).reshape(1, nb, 1)  # + position block p * nb
    ids += np.arange(0, nr * nb * nb, nb * nb, dtype=np.int64).reshape(nr, 1, 1)  # + row * nb^2
    h = np.bincount(ids.reshape(-1), minlength=nr * nb * nb).reshape(nr, nb * nb)
    if nr < nb:  # few large histograms: running sums along the last axis (contiguous), a transposed copy for p
        h = h.astype(np.int32).reshape(nr, nb, nb)
        g = np.cumsum(h, axis=2, dtype=np.int32)
        g -= h
        ht = np.ascontiguousarray(h.transpose(0, 2, 1))
        a = np.cumsum(ht, axis=2, dtype=np.int32)
        a -= ht
        a = a.transpose(0, 2, 1)
        return (a * g).reshape(r, -1).sum(axis=1, dtype=np.int64)
    # many small histograms: rows last, so every step of the running sums is one long contiguous slab
    h = np.ascontiguousarray(h.T, dtype=np.int32).reshape(nb, nb, nr)
    a = np.empty_like(h)
    a[0] = 0
    for i in range(1, nb):  # a Python loop over slabs beats np.cumsum along a non-last axis by 5-20x
        np.add(a[i - 1], h[i - 1], out=a[i])
    g = np.empty_like(h)
    g[:, 0] = 0
    for i in range(1, nb):
        np.add(g[:, i - 1], h[:, i - 1], out=g[:, i])
    a *= g  # each product <= s * s
    return a.reshape(nb * nb, r, n_rows).sum(axis=(0, 2), dtype=np.int64)


def _np_inversions_perm(p: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Inversions of permutation rows, summed per map: ``p`` and its inverse ``pi`` are int32 ``(R, N, m)``,
    every row a permutation of ``0..m-1``. Returns int64 ``(R,)``.

    Two-dimensional block decomposition (no pair enumeration, no merge passes): view row ``p`` as the points
    ``(j, p[j])`` and cut both axes into blocks of ``s = 2**ceil(log2 sqrt(m))``. An inverted pair either lies
    in two different position blocks *and* two different value buckets (counted from the block histogram by
    ``_np_cross_pairs``), or in one position block (an inversion of a length-``s`` chunk of ``p``), or in one
    value bucket but two position blocks (an inversion, strict, of the block numbers ``pi >> bits`` along a
    length-``s`` chunk of ``pi``). The chunks are sub-problems of length ``s ~ sqrt(m)``: ranked into
    permutations by one sort of packed ``(value, index)`` int32 keys (a second sort gives the inverse) and
    solved the same way, down to length ``_INV_BRUTE_MAX``, which is counted pair by pair. For
    ``m = 224 * 224`` that is one level (chunks of 256, then 16). Rows are padded to a multiple of ``s`` with
    fixed points past the end, which add no inversions.
    """
    r, n_rows, m = p.shape
    if m <= _INV_BRUTE_MAX:
        return _np_inversions_brute(np.ascontiguousarray(p.transpose(0, 2, 1), dtype=np.uint8))
    bits = math.isqrt(m - 1).bit_length()  # 2**bits >= sqrt(m)
    s = 1 << bits
    nb = -(-m // s)
    if nb * s > m:
        tail = np.broadcast_to(np.arange(m, nb * s, dtype=np.int32), (r, n_rows, nb * s - m))
        p = np.concatenate([p, tail], axis=2)
        pi = np.concatenate([pi, tail], axis=2)
    out = _np_cross_pairs(p, bits, nb)
    k = n_rows * nb  # chunks per map in each family
    if s <= _INV_BRUTE_MAX:
        x = np.empty((r, s, 2 * k), dtype=np.uint8 if nb * s <= 256 else np.int32)
        x[:, :, :k] = p.reshape(r, k, s).transpose(0, 2, 1)
        x[:, :, k:] = (pi >> bits).reshape(r, k, s).transpose(0, 2, 1)
        return out + _np_inversions_brute(x)
    ar = np.arange(s, dtype=np.int32)
    keys = np.empty((r, 2 * k, s), dtype=np.int32)  # (value, index) packed; values < nb * s <= 2**(2 bits)
    np.left_shift(p.reshape(r, k, s), bits, out=keys[:, :k])
    np.bitwise_and(pi.reshape(r, k, s), ~(s - 1), out=keys[:, k:])  # block number; ties keep index order
    keys |= ar
    keys.sort(axis=-1)
    keys &= s - 1  # rank -> index within the chunk
    qi = keys.copy()
    keys <<= bits
    keys |= ar
    keys.sort(axis=-1)
    keys &= s - 1  # index -> rank
    return out + _np_inversions_perm(keys, qi)


def _np_tied_pairs(s: np.ndarray) -> np.ndarray:
    """Per row of the sorted ``(R, D)`` array ``s`` (any strides), the number of pairs of equal values, int64."""
    r, d = s.shape
    tie = np.zeros((r, d), np.bool_)
    np.equal(s[:, 1:], s[:, :-1], out=tie[:, 1:])
    flat = tie.reshape(-1)
    n_tie = int(np.count_nonzero(flat))
    if n_tie == 0:
        return np.zeros(r, np.int64)
    if 2 * n_tie > flat.size:  # few runs: lengths from consecutive run starts
        starts = np.flatnonzero(~flat)
        length = np.diff(starts, append=flat.size)
        pairs = length * (length - 1) // 2
        row = starts // d
    else:  # few ties: the k-th tie of a streak closes k pairs
        idx = np.flatnonzero(flat)
        first = np.ones(idx.size, np.bool_)
        first[1:] = idx[1:] != idx[:-1] + 1
        ar = np.arange(idx.size)
        pairs = ar - np.maximum.accumulate(ar * first) + 1
        row = idx // d
    out = np.zeros(r, np.int64)
    np.add.at(out, row, pairs)
    return out


def _np_rank_key(x: np.ndarray) -> np.ndarray:
    """int32 keys ``(R, D)`` ordered like the float64 rows ``x``, equal values equal: 1-based dense ranks.

    The sort is of int64 keys: the float's signed-monotone bit pattern with its lowest ``ceil(log2 D)`` bits
    replaced by the element's index (a value sort that carries its arg-sort, 2-3x cheaper than
    ``np.argsort``). Values that differ only in those bits may come out of order; such rows (checked on the
    full keys) are arg-sorted exactly instead."""
    r, d = x.shape
    bits = (x + 0.0).view(np.int64)  # -0.0 -> +0.0
    k = (bits >> 63) & 0x7FFFFFFFFFFFFFFF
    k ^= bits
    nbits = max(1, (d - 1).bit_length())
    mask = (1 << nbits) - 1
    packed = k & ~mask
    packed |= np.arange(d, dtype=np.int64)
    packed.sort(axis=-1)
    packed &= mask
    idx = packed
    ks = np.take_along_axis(k, idx, axis=-1)
    bad = np.flatnonzero((ks[:, 1:] < ks[:, :-1]).any(axis=1))
    if bad.size:  # re-sort those rows by (run of equal high bits, low bits, index): exact
        kb, ib = ks[bad], idx[bad]
        if 3 * nbits <= 63:
            run = np.zeros(kb.shape, np.int64)
            np.not_equal(kb[:, 1:] >> nbits, kb[:, :-1] >> nbits, out=run[:, 1:])
            np.cumsum(run, axis=-1, out=run)
            run <<= 2 * nbits
            run |= (kb & mask) << nbits
            run |= ib
            run.sort(axis=-1)
            ib = run & mask
        else:  # pragma: no cover - rows of more than 2**21 elements
            ib = np.argsort(k[bad], axis=-1)
        idx[bad] = ib
        ks[bad] = np.take_along_axis(k[bad], ib, axis=-1)
    new = np.ones((r, d), np.int32)
    np.not_equal(ks[:, 1:], ks[:, :-1], out=new[:, 1:])
    key = np.empty((r, d), np.int32)
    idx += np.arange(0, r * d, d, dtype=np.int64).reshape(r, 1)  # flat scatter: 3x cheaper than put_along_axis
    key.reshape(-1)[idx.reshape(-1)] = np.cumsum(new, axis=-1, dtype=np.int32).reshape(-1)
    return key


def _np_kendall_counts(ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """``(n1, n2, n3, n_d)`` per row as int64 ``(R, 4)`` from int32 order keys ``ka``, ``kb`` ``(R, D)``: pairs
    tied in a, tied in b, tied in both, and strictly discordant pairs.

    One sort of the int64 keys ``(ka, kb)`` gives the ``(a, b)`` order (position ``j``); a second sort of
    ``(kb, j)`` gives, for the element of ``(b, a)``-rank ``v``, its ``(a, b)``-rank ``pi[v]``. A pair is
    counted by ``pi`` as an inversion exactly when it is strictly discordant (a tie in ``a`` or ``b`` keeps
    the two orders equal), so ``n_d`` is the inversion count of the permutation ``pi``."""
    r, d = ka.shape
    joint = ka.astype(np.int64)
    joint <<= 32
    joint |= (kb.view(np.uint32) ^ np.uint32(0x80000000)).astype(np.int64)  # signed order as unsigned
    joint.sort(axis=-1)
    n3 = _np_tied_pairs(joint)
    n1 = _np_tied_pairs(joint.view(np.int32)[:, 1::2] if _LITTLE_ENDIAN else joint >> 32)
    nbits = max(1, (d - 1).bit_length())
    mask = (1 << nbits) - 1
    ar = np.arange(d, dtype=np.int64)
    key = joint & 0xFFFFFFFF
    key <<= nbits
    key |= ar
    key.sort(axis=-1)
    n2 = _np_tied_pairs(key >> nbits)
    key &= mask
    pi = key.astype(np.int32)  # (b, a)-rank -> (a, b)-rank
    key += np.arange(0, r * d, d, dtype=np.int64).reshape(r, 1)
    p = np.empty((r, d), np.int32)  # the inverse permutation, by a flat scatter
    p.reshape(-1)[key.reshape(-1)] = np.broadcast_to(ar.astype(np.int32), (r, d)).reshape(-1)
    n_d = _np_inversions_perm(p.reshape(r, 1, d), pi.reshape(r, 1, d))
    return np.stack([n1, n2, n3, n_d], axis=1)


def _kendall_counts_cpu(fa: Tensor, fb: Tensor) -> Tensor:
    """``(n1, n2, n3, n_d)`` int64 ``(B, 4)`` for CPU maps ``(B, D)``, ``D >= 2``: float32 order keys where the
    values are float32 (exact), dense ranks otherwise; rows split over the row-sort thread pool in groups of
    about ``_KENDALL_GROUP_ELEMENTS`` elements (numpy releases the GIL in sorts and ufuncs)."""
    bsz, d = fa.shape
    keys = []
    for x in (fa, fb):
        k = _float32_order_key(x)
        keys.append(k.numpy() if k is not None else x.detach().to(torch.float64).numpy())
    ka, kb = keys
    out = np.empty((bsz, 4), np.int64)
    group = max(1, _KENDALL_GROUP_ELEMENTS // d)

    def work(rows: slice) -> None:
        lo, hi, _ = rows.indices(bsz)
        for i in range(lo, hi, group):
            sl = slice(i, min(i + group, hi))
            xa, xb = ka[sl], kb[sl]
            xa = xa if xa.dtype == np.int32 else _np_rank_key(xa)
            xb = xb if xb.dtype == np.int32 else _np_rank_key(xb)
            out[sl] = _np_kendall_counts(xa, xb)

    _run_rows(work, bsz, fa.numel())
    return torch.from_numpy(out)


def _sum_tied_pairs(tie: Tensor, bsz: int, d: int) -> Tensor:
    """Per row, the number of pairs of equal values, sum over runs of ``c (c - 1) / 2``, as int64 ``(B,)``.

    ``tie`` is the flat ``(B * D,)`` bool of sorted rows, True where an element equals the previous one
    (False at every row start). Works from whichever list is shorter, the ties or the run starts, so it costs
    one scan plus work proportional to ``min(#ties, #runs)`` (continuous maps have few ties, quantised maps
    few runs).
    """
    out = torch.zeros(bsz, dtype=torch.long, device=tie.device)
    n = tie.numel()
    n_tie = int(tie.sum())
    if n_tie == 0:
        return out
    if 2 * n_tie > n:  # few runs: lengths from consecutive run starts
        starts = (~tie).nonzero().squeeze(1)
        length = torch.diff(starts, append=starts.new_full((1,), n))
        return out.index_add_(0, starts // d, length * (length - 1) // 2)
    idx = tie.nonzero().squeeze(1)  # few ties: the k-th tie of a streak closes k pairs
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1] + 1
    ar = torch.arange(idx.numel(), device=idx.device)
    return out.index_add_(0, idx // d, ar - (ar * first).cummax(0).values + 1)


def _flat_ties(sorted_rows: Tensor) -> Tensor:
    """Flat bool ``(B * D,)`` for sorted rows ``(B, D)`` (any strides): True where an element equals the
    previous one of its row."""
    tie = torch.zeros(sorted_rows.shape, dtype=torch.bool, device=sorted_rows.device)
    torch.eq(sorted_rows[:, 1:], sorted_rows[:, :-1], out=tie[:, 1:])
    return tie.view(-1)


def _dense_rank_sorted(tie: Tensor, bsz: int, d: int) -> Tensor:
    """0-based dense ranks ``(B, D)`` int32 of sorted rows, in sorted order, from their flat ``_flat_ties``."""
    return (~tie).view(bsz, d).cumsum(dim=-1, dtype=torch.int32).sub_(1)


def _float32_order_key(x: Tensor) -> Tensor | None:
    """int32 keys ``(B, D)`` ordered like the values of ``x``, or ``None`` unless every value is exactly a
    float32 (float32/16/bfloat16 maps always; float64 maps when they round-trip). The key is the float32 bit
    pattern made signed-monotone; ``-0.0`` becomes ``+0.0`` first so the two compare equal, as floats do."""
    if x.dtype == torch.float64:
        x32 = x.float()
        if not bool((x32 == x).all()):
            return None
        x32.add_(0.0)  # turns -0.0 into +0.0
    else:
        x32 = x.to(torch.float32) + 0.0  # a new tensor, -0.0 turned into +0.0
    bits = x32.view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def _dilate(mask: Tensor, window: int) -> Tensor:
    """``N_w``: dilate a bool ``(B, H, W)`` mask by a ``(2w+1)^2`` square, clipped at the borders."""
    if window == 0:
        return mask
    h, w = mask.shape[-2:]
    win = min(window, max(h, w) - 1)  # a larger window already covers the whole image
    if win == 0:
        return mask
    pooled = F.max_pool2d(mask.to(torch.float32).unsqueeze(1), kernel_size=2 * win + 1, stride=1, padding=win)
    return pooled.squeeze(1) > 0.5


def _window_index(p: Tensor, h: int, w: int, win: int) -> Tensor:
    """Flat indices of the ``(2 win + 1)^2`` window around each flat pixel index in ``p`` (any shape),
    shape ``(*p.shape, K)``; offsets falling outside the image map to the dummy index ``h * w``."""
    off = torch.arange(-win, win + 1, device=p.device)
    dr = off.repeat_interleave(off.numel())
    dc = off.repeat(off.numel())
    r = (p // w).unsqueeze(-1) + dr
    c = (p % w).unsqueeze(-1) + dc
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    return torch.where(inside, r * w + c, h * w)


_WINDOW_TABLE_MAX = 1 << 22  # entries; above this the window indices are computed per step instead


_DIV_SLOT_TABLE_MAX = 1 << 24  # entries of the (candidates x window) neighbour table; above it the plain greedy runs
_DIV_CHECK_EVERY = 64  # scan steps between checks whether every map has its k picks


def _topk_div_mask(a: Tensor, k: int, window: int, names: tuple[str, ...] = ("a",)) -> Tensor:
    """Unchecked core of :func:`topk_div`, by a scan of the pixels in greedy order.

    The greedy "take the best available pixel, then exclude its window" selects exactly the pixels that, in
    the order (value descending, flat index ascending), come before every *selected* pixel of their window:
    the best available pixel is the first one in that order not yet excluded. So the candidates are sorted
    once and scanned in order, one step per candidate for the whole batch: a candidate not yet blocked is
    selected and blocks the candidates in its window (a neighbour table in candidate-slot space, built
    vectorised beforehand). Only the first ``M`` candidates are sorted and scanned: ``M`` starts near ``2k``
    (or at the bound when that is at most 4x more), grows 4x whenever some map has fewer than ``k`` picks (its
    first picks are unchanged), and never needs to exceed ``(k - 1) K + 1`` (``K = (2w+1)^2``: ``k - 1``
    picks block at most ``(k - 1) K`` pixels); the scan stops once every map has ``k`` picks. The
    per-step work is a few operations on ``B`` and ``B x K`` elements instead of an arg-max over all
    candidates; on CPU it runs on numpy views. ``a`` may stack several inputs of equal batch size (``names``,
    for the error message).
    """
    bsz, h, w = a.shape
    d = h * w
    win = min(window, max(h, w) - 1)
    n_win = (2 * win + 1) ** 2
    bound = min(d, (k - 1) * n_win + 1)
    m = min(bound, max(2 * k + 64, 256))
    if bound <= 4 * m:  # one scan of every candidate the greedy can need costs less than a second scan
        m = bound
    if bsz == 0:
        return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    flat = _flat(a).detach()
    while True:
        if bsz * m * n_win > _DIV_SLOT_TABLE_MAX:
            return _topk_div_mask_greedy(a, k, window, names)
        picks, n_sel = _topk_div_scan(flat, h, w, win, k, m)
        if m == bound or picks is not None:
            break
        m = min(bound, 4 * m)
    ok = n_sel >= k
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()[:5]
        part = bsz // len(names)
        where = ", ".join(f"`{names[i // part]}`[{i % part}]" for i in bad.tolist())
        raise ValueError(
            f"`k`={k} is too large for top-k-div with window={window} on {h}x{w} maps: {where} ran out of "
            f"selectable pixels after {n_sel[bad].tolist()} picks (each pick excludes its "
            f"{2 * win + 1}x{2 * win + 1} window; k <= {math.ceil(d / n_win)} always succeeds)"
        )
    selected = torch.zeros(bsz, d, dtype=torch.bool, device=a.device)
    selected.scatter_(1, picks, True)
    return selected.reshape(bsz, h, w)


def _topk_div_scan(flat: Tensor, h: int, w: int, win: int, k: int, m: int) -> tuple[Tensor | None, Tensor]:
    """Greedy scan of the ``m`` best candidates of every row of ``flat`` ``(B, D)``: the first ``k`` picks as
    pixel indices ``(B, k)`` (``None`` if some row has fewer among the ``m`` candidates) and the number of
    picks, capped at ``k``, ``(B,)``."""
    bsz, d = flat.shape
    dev = flat.device
    if m < d:
        cand = _topk_mask(flat, m).nonzero()[:, 1].view(bsz, m)  # top-m pixels, increasing index
        vals = flat.gather(1, cand)
    else:
        cand, vals = torch.arange(d, device=dev).expand(bsz, d), flat
    pix = cand.gather(1, _greedy_order(vals))  # (B, m) pixel of each candidate slot
    slot = torch.full((bsz, d + 1), m, dtype=torch.long, device=dev)  # pixel -> slot (m: not a candidate)
    slot.scatter_(1, pix, torch.arange(m, device=dev).expand(bsz, m))
    table = _window_table(h, w, win, dev)  # (D, K) window pixels, dummy D
    nbr = slot.gather(1, table[pix].view(bsz, -1)).view(bsz, m, -1)  # (B, m, K) window slots, dummy m
    # (m, K, B): the window slots of scan step i form one contiguous block; flat into (m + 1, B) "blocked"
    cols = torch.arange(bsz, device=dev)
    nbr_t = (nbr.permute(1, 2, 0) * bsz + cols).contiguous()
    dummy = (m * bsz + cols).expand_as(nbr_t[0]).contiguous()
    cpu = dev.type == "cpu" and _NUMPY_CPU_PATHS
    if cpu:
        nbr_t, dummy = nbr_t.numpy(), dummy.numpy()
        blk = np.zeros((m + 1) * bsz, np.bool_)
        sel = np.zeros((m, bsz), np.bool_)
        where, logical_not = np.where, np.logical_not
    else:
        blk = torch.zeros((m + 1) * bsz, dtype=torch.bool, device=dev)
        sel = torch.zeros(m, bsz, dtype=torch.bool, device=dev)
        where, logical_not = torch.where, torch.logical_not
    done, count = m, 0
    for i in range(m):
        free = sel[i]
        logical_not(blk[i * bsz : (i + 1) * bsz], out=free)  # not blocked by an earlier pick: selected
        blk[where(free, nbr_t[i], dummy)] = True  # ... and it blocks its window
        if (i + 1) % _DIV_CHECK_EVERY == 0:
            count = count + sel[i + 1 - _DIV_CHECK_EVERY : i + 1].sum(0)
            if bool((count >= k).all()):
                done = i + 1
                break
    sel_t = (torch.from_numpy(sel) if cpu else sel)[:done].T  # (B, done)
    rank = sel_t.cumsum(1, dtype=torch.int32)
    n_sel = rank[:, -1].clamp(max=k)
    if not bool((n_sel >= k).all()):
        return None, n_sel
    first_k = (sel_t & (rank <= k)).nonzero()[:, 1].view(bsz, k)  # slots of the first k picks, in order
    return pix.gather(1, first_k), n_sel


def _greedy_order(vals: Tensor) -> Tensor:
    """Permutation of every row of ``vals`` ``(B, m)`` into greedy order: value descending, ties by increasing
    position. float32-valued rows on CPU sort packed int64 keys ``(~float32 order key, position)`` with numpy
    (one value sort, no arg-sort); otherwise a stable ``torch.sort``."""
    key = _float32_order_key(vals) if vals.device.type == "cpu" and _NUMPY_CPU_PATHS else None
    if key is None:
        return torch.sort(vals, dim=1, descending=True, stable=True).indices
    packed = key.numpy().astype(np.int64)
    np.invert(packed, out=packed)  # descending values
    packed <<= 32
    packed |= np.arange(vals.shape[1], dtype=np.int64)
    packed.sort(axis=-1)
    packed &= 0xFFFFFFFF
    return torch.from_numpy(packed)


_WINDOW_TABLES: dict[tuple[int, int, int, str], Tensor] = {}


def _window_table(h: int, w: int, win: int, device: torch.device) -> Tensor:
    """``_window_index`` of every pixel of an ``h x w`` map, ``(h * w, K)``, cached per shape (a few small
    tables)."""
    key = (h, w, win, str(device))
    table = _WINDOW_TABLES.get(key)
    if table is None:
        if len(_WINDOW_TABLES) >= 8:
            _WINDOW_TABLES.clear()
        table = _window_index(torch.arange(h * w, device=device), h, w, win)
        _WINDOW_TABLES[key] = table
    return table


def _topk_div_mask_greedy(a: Tensor, k: int, window: int, names: tuple[str, ...] = ("a",)) -> Tensor:
    """Reference form of :func:`_topk_div_mask` (used when its neighbour table would be too large): ``k``
    greedy steps, each one ``max`` and one ``scatter``.

    Before pick ``j`` at most ``(j - 1) K`` pixels are excluded (``K = (2w+1)^2``), so every pick lies among
    the ``(k - 1) K + 1`` highest-ranked pixels: the greedy runs on those candidates only (kept in increasing
    pixel order, so the first maximum is still the lowest flat index), which is exact and much cheaper for
    large maps. ``a`` may stack several inputs of equal batch size (``names``, for the error message).
    """
    bsz, h, w = a.shape
    d = h * w
    win = min(window, max(h, w) - 1)
    dev = a.device
    flat = _flat(a)
    n_win = (2 * win + 1) ** 2
    m = min(d, (k - 1) * n_win + 1)
    vals = torch.empty(bsz, m + 1, dtype=a.dtype, device=dev)
    vals[:, m] = -math.inf  # dummy slot that absorbs out-of-image / non-candidate window pixels
    if m < d:
        cand = _topk_mask(flat, m).nonzero()[:, 1].view(bsz, m)  # candidate pixels, increasing index
        slot = torch.full((bsz, d + 1), m, dtype=torch.long, device=dev)  # pixel -> candidate slot
        slot.scatter_(1, cand, torch.arange(m, device=dev).expand(bsz, m))
        vals[:, :m] = flat.gather(1, cand)
    else:
        cand = slot = None
        vals[:, :m] = flat
    body = vals[:, :m]
    table = _window_index(torch.arange(d, device=dev), h, w, win) if d * n_win <= _WINDOW_TABLE_MAX else None
    picks, best = [], []
    for _ in range(k):
        mx, j = body.max(dim=-1)  # first maximum -> the lower flat index wins ties
        pix = j if cand is None else cand.gather(1, j.unsqueeze(1)).squeeze(1)
        picks.append(pix)
        best.append(mx)
        nbr = table[pix] if table is not None else _window_index(pix, h, w, win)  # (B, K), dummy = d
        vals.scatter_(1, nbr if slot is None else slot.gather(1, nbr), -math.inf)
    ok = torch.isfinite(torch.stack(best, dim=1))  # (B, k); -inf max means nothing was left to pick
    idx = torch.stack(picks, dim=1)
    selected = torch.zeros(bsz, d + 1, dtype=torch.bool, device=dev)
    selected.scatter_(1, torch.where(ok, idx, d), True)
    exhausted = ~ok.all(dim=1)
    if bool(exhausted.any()):
        bad = exhausted.nonzero().flatten()[:5]
        part = bsz // len(names)
        where = ", ".join(f"`{names[i // part]}`[{i % part}]" for i in bad.tolist())
        raise ValueError(
            f"`k`={k} is too large for top-k-div with window={window} on {h}x{w} maps: {where} ran out of "
            f"selectable pixels after {ok[bad].sum(dim=1).tolist()} picks (each pick excludes its "
            f"{2 * win + 1}x{2 * win + 1} window; k <= {math.ceil(d / n_win)} always succeeds)"
        )
    return selected[:, :d].reshape(bsz, h, w)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def topk_intersection(a: Tensor, b: Tensor, k: int) -> Tensor:
    r"""Top-k intersection :math:`|T_k(a) \cap T_k(b)| / k` per sample.

    ``T_k(x)`` is the set of the ``k`` largest entries of the flattened map; ties at the k-th value are broken
    in favour of the lower flat (row-major) index, so the result is deterministic.

    Args:
        a, b: maps ``(B, H, W)`` or ``(B, D)``, same shape, floating, finite.
        k: set size, ``1 <= k <= D`` (``D = H * W``).

    Returns:
        ``(B,)`` values in ``[0, 1]``; identical maps give 1. Constant maps are not special: their top-k set is
        the first ``k`` pixels, so two constant maps give 1.0.

    >>> a = torch.tensor([[4., 3., 2., 1.]])
    >>> topk_intersection(a, torch.tensor([[4., 1., 2., 3.]]), k=2)
    tensor([0.5000])
    """
    check_two_maps(a, b)
    _check_k(k, _numel(a))
    hits = (_topk_mask(_flat(a), k) & _topk_mask(_flat(b), k)).sum(dim=-1)
    return hits.to(a.dtype) / k


def spearman(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman rank correlation per sample, identical to :func:`scipy.stats.spearmanr` (ties: average ranks).

    :math:`\rho = \mathrm{cov}(r_a, r_b) / (\sigma_{r_a} \sigma_{r_b})` where :math:`r_x` are the 1-based
    average ranks of the flattened map (a run of ties at sorted positions ``s..e`` all get ``(s+e)/2 + 1``).
    Both inputs are sorted in one call; tie runs are resolved with cumulative maxima over the sorted values
    (forward for run starts, reversed for run ends), and the correlation is accumulated exactly on integers
    (twice the centred ranks, summed in float64 below 2**53), so the result matches scipy to rounding.

    Degenerate cases (scipy returns NaN): if **both** maps of a sample are constant (every rank tied) the
    result is ``1.0``; if **exactly one** is constant it is ``0.0``. ``D == 1`` counts as constant.

    Args:
        a, b: maps ``(B, H, W)`` or ``(B, D)``, same shape, floating, finite.

    Returns:
        ``(B,)`` values in ``[-1, 1]``, dtype of ``a``.

    >>> a = torch.tensor([[1., 2., 3., 4.], [1., 1., 1., 1.]])
    >>> spearman(a, torch.tensor([[4., 3., 2., 1.], [1., 2., 2., 3.]]))
    tensor([-1.,  0.])
    """
    check_two_maps(a, b, finite=False)
    bsz, d = a.shape[0], _numel(a)
    both = torch.cat([_flat(a), _flat(b)])  # (2B, D): one sort, one rank pass
    s, i = _sort_rows(both)
    # an ascending sort puts -inf first and +inf, NaN last (CPU, CUDA), so the row ends reveal non-finite input
    ends = s[:, [0, -1]] if d else s
    if s.device.type not in ("cpu", "cuda"):
        ends = both
    if not bool(torch.isfinite(ends).all()):
        check_finite(a, "a")
        check_finite(b, "b")
    r = _twice_centred_rank_sorted(s)
    ra, rb, ia, ib = r[:bsz], r[bsz:], i[:bsz], i[bsz:]  # ranks in a-sorted / b-sorted order
    ra_orig = torch.empty(ra.shape, dtype=torch.int32, device=ra.device).scatter_(1, ia, ra)
    # ranks of a and of b, both listed in b-sorted order, as exact integers in float64 (|value| <= D)
    pair = torch.empty(bsz, 2, d, dtype=_acc_dtype(a.device), device=a.device)
    pair[:, 0].copy_(ra_orig.gather(1, ib))
    pair[:, 1].copy_(rb)
    gram = torch.bmm(pair, pair.transpose(1, 2))  # exact: integer sums < 2**53
    return _degenerate_corr(gram[:, 0, 1], gram[:, 0, 0], gram[:, 1, 1], a.dtype)


def kendall_tau(a: Tensor, b: Tensor) -> Tensor:
    r"""Kendall :math:`\tau_b` per sample, identical to :func:`scipy.stats.kendalltau` (default ``variant='b'``).

    :math:`\tau_b = (n_c - n_d) / \sqrt{(n_0 - n_1)(n_0 - n_2)}` with :math:`n_0 = D(D-1)/2`, :math:`n_1`,
    :math:`n_2` the pairs tied in ``a`` / in ``b``, :math:`n_3` the pairs tied in both, and
    :math:`n_c - n_d = n_0 - n_1 - n_2 + n_3 - 2 n_d`. Knight's algorithm, no O(D^2) pair enumeration. On CPU
    (numpy, rows split over ``torch.get_num_threads()`` threads): each map enters as int32 order keys (its
    float32 bit pattern, or dense ranks for float64 values that are not float32); one sort of the packed int64
    keys ``(a, b)`` and one of ``(b, position in that order)`` give the permutation between the two
    lexicographic orders, whose inversions are exactly the discordant pairs, counted by a two-dimensional
    block decomposition (``_np_inversions_perm``). Elsewhere a sort of ``b`` gives its dense ranks, one sort of
    the keys ``(a, rank of b)`` the order, and :math:`n_d` is counted by a vectorised radix merge. Tie counts
    come from the runs of equal sorted keys. All counts are exact int64; the final ratio is float64.

    Degenerate cases (scipy returns NaN): if **both** maps of a sample are constant the result is ``1.0``;
    if **exactly one** is constant it is ``0.0``. ``D == 1`` counts as constant.

    Args:
        a, b: maps ``(B, H, W)`` or ``(B, D)``, same shape, floating, finite.

    Returns:
        ``(B,)`` values in ``[-1, 1]``, dtype of ``a``.

    >>> a = torch.tensor([[1., 2., 3., 4.]])
    >>> kendall_tau(a, torch.tensor([[1., 3., 2., 4.]]))
    tensor([0.6667])
    """
    check_two_maps(a, b)
    fa, fb = _flat(a), _flat(b)
    bsz, d = fa.shape
    n0 = d * (d - 1) // 2
    if fa.device.type == "cpu" and _NUMPY_CPU_PATHS and d >= 2 and bsz > 0:
        n1, n2, n3, n_d = _kendall_counts_cpu(fa, fb).unbind(1)
        return _degenerate_corr(n0 - n1 - n2 + n3 - 2 * n_d, n0 - n1, n0 - n2, a.dtype)
    sb, pb = _sort_rows(fb)
    tie_b = _flat_ties(sb)
    del sb
    yb = _dense_rank_sorted(tie_b, bsz, d)  # dense rank of b, b-sorted order
    ka = _float32_order_key(fa)
    if ka is None:  # float64 values: a's dense ranks stand in for its keys
        sa, pa = _sort_rows(fa)
        ra = _dense_rank_sorted(_flat_ties(sa), bsz, d)
        ka = torch.empty_like(ra).scatter_(1, pa, ra)
        del sa, pa, ra
    # one sort of (a, rank of b) keys gives Knight's lexicographic order; equal keys are tied in both
    joint, _ = _sort_rows(ka.gather(1, pb).long().bitwise_left_shift_(32).bitwise_or_(yb), indices=False)
    del pb, yb
    if _LITTLE_ENDIAN:  # the key's two 32-bit words as strided views, without copies
        words = joint.reshape(-1).view(torch.int32).view(bsz, d, 2)
        y, key_a = words[..., 0], words[..., 1]
    else:  # pragma: no cover - no big-endian CI machine
        y, key_a = joint.bitwise_and(0xFFFFFFFF).to(torch.int32), joint.bitwise_right_shift(32)
    # y: b's dense ranks in (a, b) order
    tie_joint = _flat_ties(joint)
    tie_a = _flat_ties(key_a)
    n1 = _sum_tied_pairs(tie_a, bsz, d)
    n2 = _sum_tied_pairs(tie_b, bsz, d)
    n3 = _sum_tied_pairs(tie_joint, bsz, d)
    n_d = _count_inversions(y)
    con_minus_dis = n0 - n1 - n2 + n3 - 2 * n_d
    return _degenerate_corr(con_minus_dis, n0 - n1, n0 - n2, a.dtype)


def center_of_mass(a: Tensor) -> Tensor:
    r"""Saliency-weighted centre of mass ``(row, col)`` in pixels, per sample.

    :math:`C(a) = \sum_{i,j} a_{ij} (i, j) / \sum_{i,j} a_{ij}` with pixel ``(i, j)`` at row ``i``, column
    ``j`` (0-based, pixel centres). The map's values are the weights, so they **must be non-negative**: a
    negative entry raises ``ValueError`` (pass ``a.abs()`` for signed attributions, or clamp).

    Degenerate case: an all-zero map has no mass; its centre is defined as the image centre
    ``((H - 1) / 2, (W - 1) / 2)``.

    Args:
        a: maps ``(B, H, W)``, floating, finite, non-negative.

    Returns:
        ``(B, 2)`` tensor of ``(row, col)``, dtype of ``a``.

    >>> a = torch.zeros(2, 3, 5)
    >>> a[0, 0, 4] = 1.0
    >>> center_of_mass(a)
    tensor([[0., 4.],
            [1., 2.]])
    """
    check_one_map(a, "a", spatial=True)
    check_nonneg(a, "a")
    return _center_of_mass(a)


def _center_of_mass(a: Tensor) -> Tensor:
    """Unchecked core of :func:`center_of_mass`."""
    _, h, w = a.shape
    acc = _acc_dtype(a.device)
    x = a.to(acc)
    mass = x.sum(dim=(1, 2))
    row = (x.sum(dim=2) * torch.arange(h, dtype=acc, device=a.device)).sum(dim=1)
    col = (x.sum(dim=1) * torch.arange(w, dtype=acc, device=a.device)).sum(dim=1)
    empty = mass == 0
    safe = torch.where(empty, torch.ones_like(mass), mass)
    row = torch.where(empty, torch.full_like(row, (h - 1) / 2), row / safe)
    col = torch.where(empty, torch.full_like(col, (w - 1) / 2), col / safe)
    return torch.stack([row, col], dim=1).to(a.dtype)


def center_shift(a: Tensor, b: Tensor) -> Tensor:
    r"""Centre-of-mass shift :math:`\lVert C(a) - C(b) \rVert_2` in pixels, per sample.

    See :func:`center_of_mass` (non-negative maps required; an all-zero map's centre is the image centre, so
    two all-zero maps give ``0.0``).

    Args:
        a, b: maps ``(B, H, W)``, same shape, floating, finite, non-negative.

    Returns:
        ``(B,)`` distances ``>= 0``, dtype of ``a``; identical maps give 0.

    >>> a = torch.zeros(1, 5, 5); a[0, 0, 0] = 1.0
    >>> b = torch.zeros(1, 5, 5); b[0, 3, 4] = 1.0
    >>> center_shift(a, b)
    tensor([5.])
    """
    check_two_maps(a, b, spatial=True)
    check_nonneg(a, "a")
    check_nonneg(b, "b")
    return (_center_of_mass(a) - _center_of_mass(b).to(a.dtype)).norm(dim=1)


def topk_div(a: Tensor, k: int, window: int) -> Tensor:
    r"""Top-k-div set (Kamath et al.) as a boolean mask ``(B, H, W)`` with exactly ``k`` True pixels per sample.

    Greedy: repeat ``k`` times — take the highest-valued pixel that is still available (ties: lower flat
    index), then make its whole ``(2w+1) x (2w+1)`` window (clipped at the borders, no row wrap-around)
    unavailable. Selected pixels are therefore more than ``window`` apart in Chebyshev distance. Computed as
    one scan of the best candidates in greedy order (value descending, lower index first), batched over
    ``B``: a candidate is picked unless an earlier pick's window covers it.

    Degenerate case: if some sample runs out of available pixels before ``k`` picks (the windows cover the
    image), a ``ValueError`` naming ``k`` is raised (how many picks fit is data dependent; at least
    ``ceil(H*W / (2w+1)^2)`` always do). ``window=0`` gives the plain top-k set.

    Args:
        a: maps ``(B, H, W)``, floating, finite.
        k: number of pixels, ``1 <= k <= H * W``.
        window: half-width ``w >= 0`` of the exclusion window.

    Returns:
        ``torch.bool`` mask ``(B, H, W)``.

    >>> a = torch.tensor([[[9., 8., 1.], [7., 2., 3.], [1., 1., 5.]]])
    >>> topk_div(a, k=2, window=1).int()
    tensor([[[1, 0, 0],
             [0, 0, 0],
             [0, 0, 1]]], dtype=torch.int32)
    """
    check_one_map(a, "a", spatial=True)
    _check_k(k, _numel(a))
    _check_window(window)
    return _topk_div_mask(a, k, window)


def lens_topk(a: Tensor, b: Tensor, k: int, window: int, mode: str = "recall", diverse: bool = False) -> Tensor:
    r"""Locality-sensitive top-k metrics (LENS, Kamath et al.), per sample.

    With :math:`N_w(T)` the union of the ``(2w+1) x (2w+1)`` windows around the pixels of ``T`` (clipped at
    the borders, no row wrap-around):

    * ``mode="recall"``:    :math:`|N_w(T_k(a)) \cap T_k(b)| / k`
    * ``mode="precision"``: :math:`|T_k(a) \cap N_w(T_k(b))| / k`

    ``T_k`` is the top-k set (ties: lower flat index), or the top-k-div set of :func:`topk_div` (same ``k``
    and ``window``) when ``diverse=True``. ``window=0`` reduces to :func:`topk_intersection`.

    Degenerate cases: constant maps are not special (top-k of a constant map is its first ``k`` pixels);
    with ``diverse=True`` a ``k`` that top-k-div cannot reach raises ``ValueError`` (see :func:`topk_div`).

    Args:
        a, b: maps ``(B, H, W)``, same shape, floating, finite.
        k: set size, ``1 <= k <= H * W``.
        window: half-width ``w >= 0``.
        mode: ``"recall"`` or ``"precision"``.
        diverse: use top-k-div sets.

    Returns:
        ``(B,)`` values in ``[0, 1]``, dtype of ``a``; identical maps give 1.

    >>> a = torch.zeros(1, 4, 4); a[0, 0, 0] = 1.0
    >>> b = torch.zeros(1, 4, 4); b[0, 1, 1] = 1.0
    >>> lens_topk(a, b, k=1, window=0), lens_topk(a, b, k=1, window=1)
    (tensor([0.]), tensor([1.]))
    """
    check_two_maps(a, b, spatial=True)
    _check_k(k, _numel(a))
    _check_window(window)
    if mode not in _LENS_MODES:
        raise ValueError(f"`mode` must be one of {_LENS_MODES}, got {mode!r}")
    if not isinstance(diverse, bool):
        raise TypeError(f"`diverse` must be a bool, got {type(diverse).__name__}")
    if diverse:
        both = _topk_div_mask(torch.cat([a, b.to(a.dtype)]), k, window, names=("a", "b"))  # one greedy loop
        ta, tb = both[: a.shape[0]], both[a.shape[0] :]
    else:
        ta, tb = _topk_mask(_flat(a), k).view_as(a), _topk_mask(_flat(b), k).view_as(b)
    hits = _dilate(ta, window) & tb if mode == "recall" else ta & _dilate(tb, window)
    return hits.sum(dim=(1, 2)).to(a.dtype) / k


def mask_mass(a: Tensor, mask: Tensor) -> Tensor:
    r"""Fraction of a non-negative map's mass inside a ground-truth mask: :math:`\sum a \cdot m / \sum a`.

    ``a`` must be non-negative (a negative entry raises ``ValueError``; pass ``a.abs()`` for signed maps).

    Degenerate case: an all-zero map carries no evidence and scores ``0.0``; an empty mask gives ``0.0``.

    Args:
        a: maps ``(B, H, W)`` or ``(B, D)``, floating, finite, non-negative.
        mask: same shape as ``a``; ``torch.bool`` or numeric with values in ``{0, 1}``.

    Returns:
        ``(B,)`` values in ``[0, 1]``, dtype of ``a``.

    >>> a = torch.tensor([[1., 3., 0., 0.]])
    >>> mask_mass(a, torch.tensor([[False, True, True, False]]))
    tensor([0.7500])
    """
    check_one_map(a, "a")
    check_nonneg(a, "a")
    m = check_mask(mask, a)
    acc = _acc_dtype(a.device)
    x = _flat(a).to(acc)
    total = x.sum(dim=-1)
    inside = (x * _flat(m)).sum(dim=-1)
    frac = torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    return frac.clamp(0.0, 1.0).to(a.dtype)


def pointing_game(a: Tensor, mask: Tensor) -> Tensor:
    r"""Pointing game: ``1.0`` if the map's maximum lies inside the mask, else ``0.0``, per sample.

    The maximum is :math:`\arg\max_p a_p`; if several pixels share the maximum value, the one with the lowest
    flat (row-major) index is used. Signed maps are fine (only the ordering matters).

    Degenerate case: a constant map (including all-zero) points nowhere and scores ``0.0``.

    Args:
        a: maps ``(B, H, W)`` or ``(B, D)``, floating, finite.
        mask: same shape as ``a``; ``torch.bool`` or numeric with values in ``{0, 1}``.

    Returns:
        ``(B,)`` values in ``{0.0, 1.0}``, dtype of ``a``.

    >>> a = torch.tensor([[0., 5., 1.], [2., 2., 2.]])
    >>> pointing_game(a, torch.tensor([[0, 1, 0], [1, 1, 1]]))
    tensor([1., 0.])
    """
    check_one_map(a, "a")
    m = check_mask(mask, a)
    fa = _flat(a)
    idx = fa.argmax(dim=-1, keepdim=True)
    hit = _flat(m).gather(1, idx).squeeze(1)
    constant = fa.amax(dim=-1) == fa.amin(dim=-1)
    return (hit & ~constant).to(a.dtype)
