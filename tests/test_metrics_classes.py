"""Tests for the torchmetrics classes in fragdefense.metrics."""

from __future__ import annotations

import doctest

import pytest
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

import fragdefense.metrics as M
import fragdefense.metrics.functional as MF


def _maps(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _masks(shape, seed):
    return _maps(shape, seed) > 0.6


# (factory, functional reference, second argument kind, higher_is_better)
CASES = {
    "topk": (lambda **kw: M.TopKIntersection(k=5, **kw), lambda a, b: MF.topk_intersection(a, b, 5), "map", True),
    "spearman": (lambda **kw: M.SpearmanRank(**kw), MF.spearman, "map", True),
    "kendall": (lambda **kw: M.KendallTau(**kw), MF.kendall_tau, "map", True),
    "center_shift": (lambda **kw: M.CenterShift(**kw), MF.center_shift, "map", False),
    "lens": (
        lambda **kw: M.LensTopK(k=4, window=1, mode="precision", diverse=True, **kw),
        lambda a, b: MF.lens_topk(a, b, 4, 1, mode="precision", diverse=True),
        "map",
        True,
    ),
    "mask_mass": (lambda **kw: M.MaskMass(**kw), MF.mask_mass, "mask", True),
    "pointing": (lambda **kw: M.PointingGame(**kw), MF.pointing_game, "mask", True),
}


def _batches(kind: str, sizes=(3, 5, 1, 4)):
    out = []
    for i, n in enumerate(sizes):
        a = _maps((n, 8, 9), 10 * i)
        b = _maps((n, 8, 9), 10 * i + 1) if kind == "map" else _masks((n, 8, 9), 10 * i + 1)
        out.append((a, b))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_accumulate_equals_functional_mean_and_per_sample(name):
    make, ref, kind, _ = CASES[name]
    batches = _batches(kind)
    a_all = torch.cat([a for a, _ in batches])
    b_all = torch.cat([b for _, b in batches])
    expected = ref(a_all, b_all)

    m = make(per_sample=True)
    for a, b in batches:
        m.update(a, b)
    torch.testing.assert_close(m.compute(), expected.mean().float(), atol=1e-6, rtol=0)
    # per-sample values are kept in the metric's dtype (float32 by default) ...
    torch.testing.assert_close(m.compute_per_sample(), expected.float())
    assert int(m.count) == a_all.shape[0]
    # ... and set_dtype(float64) keeps the functional core's float64 values exactly
    m64 = make(per_sample=True).set_dtype(torch.float64)
    for a, b in batches:
        m64.update(a, b)
    torch.testing.assert_close(m64.compute_per_sample(), expected, atol=0, rtol=0)

    plain = make()
    for a, b in batches:
        plain.update(a, b)
    torch.testing.assert_close(plain.compute(), m.compute())
    with pytest.raises(RuntimeError, match="per_sample=True"):
        plain.compute_per_sample()


@pytest.mark.parametrize("name", list(CASES))
def test_forward_returns_batch_value_and_accumulates(name):
    make, ref, kind, _ = CASES[name]
    batches = _batches(kind, sizes=(4, 2))
    m = make(per_sample=True)
    first = m(*batches[0])
    torch.testing.assert_close(first, ref(*batches[0]).mean().float(), atol=1e-6, rtol=0)
    m(*batches[1])
    assert m.compute_per_sample().shape == (6,)
    torch.testing.assert_close(
        m.compute(), torch.cat([ref(*batches[0]), ref(*batches[1])]).mean().float(), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", list(CASES))
def test_reset(name):
    make, ref, kind, _ = CASES[name]
    (a, b), (c, d) = _batches(kind, sizes=(3, 2))
    m = make(per_sample=True)
    m.update(a, b)
    m.reset()
    assert int(m.count) == 0 and float(m.sum) == 0.0
    assert m.compute_per_sample().shape == (0,)
    with pytest.raises(RuntimeError, match="no samples"), pytest.warns(UserWarning):
        m.compute()
    m.update(c, d)
    torch.testing.assert_close(m.compute_per_sample(), ref(c, d).float())


@pytest.mark.parametrize("name", list(CASES))
def test_attributes_and_reductions(name):
    make, _, _, hib = CASES[name]
    m = make(per_sample=True)
    assert isinstance(m, Metric)
    assert m.higher_is_better is hib
    assert m.full_state_update is False
    assert m.is_differentiable is False
    # sum/count are summed across processes, the per-sample list is concatenated
    assert m._reductions["sum"] is dim_zero_sum
    assert m._reductions["count"] is dim_zero_sum
    assert m._reductions["values"] is dim_zero_cat
    assert "values" not in make()._defaults


@pytest.mark.parametrize("name", list(CASES))
def test_merge_state_like_ddp(name):
    """Two 'ranks' with different batch sizes merge to the global per-sample mean."""
    make, ref, kind, _ = CASES[name]
    (a, b), (c, d) = _batches(kind, sizes=(5, 2))
    r0, r1 = make(per_sample=True), make(per_sample=True)
    r0.update(a, b)
    r1.update(c, d)
    r0.merge_state(r1)
    expected = torch.cat([ref(a, b), ref(c, d)])
    torch.testing.assert_close(r0.compute(), expected.mean().float(), atol=1e-6, rtol=0)
    # merged samples are all there (the order across ranks is torchmetrics' business)
    torch.testing.assert_close(r0.compute_per_sample().sort().values, expected.float().sort().values)


def test_constructor_validation():
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        M.TopKIntersection(k=0)
    with pytest.raises(TypeError, match="`k` must be an int"):
        M.LensTopK(k=2.5, window=1)
    with pytest.raises(ValueError, match="`window` must be >= 0"):
        M.LensTopK(k=2, window=-1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        M.LensTopK(k=2, window=1, mode="both")
    with pytest.raises(TypeError, match="`diverse` must be a bool"):
        M.LensTopK(k=2, window=1, diverse="yes")
    with pytest.raises(TypeError, match="`per_sample` must be a bool"):
        M.SpearmanRank(per_sample=1)


def test_update_errors_come_from_functional_core():
    m = M.TopKIntersection(k=50)
    with pytest.raises(ValueError, match=r"`k` must be >= 1 and <= 20"):
        m.update(torch.rand(2, 4, 5), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="`a` and `b` must have the same shape"):
        M.SpearmanRank().update(torch.rand(2, 4, 5), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="`mask` must have the same shape"):
        M.MaskMass().update(torch.rand(2, 4, 5), torch.ones(2, 4, 4, dtype=torch.bool))


def test_package_exports_and_lazy_import():
    assert set(M.__all__) >= {"SpearmanRank", "spearman", "topk_div", "functional"}
    assert M.spearman is MF.spearman
    assert "KendallTau" in dir(M)
    with pytest.raises(AttributeError):
        M.NotAMetric  # noqa: B018


def test_class_doctests_run():
    from fragdefense.metrics import _classes

    res = doctest.testmod(_classes, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 7 and res.failed == 0


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One process of a real gloo group: rank 0 scores float64 maps, rank 1 float16 maps or nothing."""
    import json
    import os
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*called before the ``update``")  # rank 1 in "rank1_empty"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for case in ("both", "rank1_empty"):
            for name in ("spearman", "kendall", "topk", "mask_mass"):
                make, _, kind, _ = CASES[name]
                m = make(per_sample=True)
                (a, b), (c, d) = _batches(kind, sizes=(5, 3))
                if rank == 0:
                    m.update(a, b)
                elif case == "both":
                    m.update(c.half(), d.half() if d.is_floating_point() else d)
                result[f"{case}/{name}"] = {
                    "mean": float(m.compute()),
                    "per_sample": sorted(m.compute_per_sample().tolist()),
                }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_real_ddp_gather_with_mixed_dtypes_and_an_empty_rank(tmp_path):
    """Two gloo processes: the mean and the per-sample values are the union over both processes, also when
    the processes' maps have different dtypes (float64 / float16) and when one process saw no sample (its
    per-sample list is torchmetrics' empty stand-in in the metric's dtype: a dtype mismatch aborts gloo)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("spearman", "kendall", "topk", "mask_mass"):
        _, ref, kind, _ = CASES[name]
        (a, b), (c, d) = _batches(kind, sizes=(5, 3))
        v0 = ref(a, b)
        v1 = ref(c.half(), d.half() if d.is_floating_point() else d).double()
        for case, values in (("both", torch.cat([v0, v1])), ("rank1_empty", v0)):
            for r in range(2):  # every process sees the same synced result
                got = res[r][f"{case}/{name}"]
                assert got["mean"] == pytest.approx(float(values.mean()), abs=1e-6), (case, name, r)
                torch.testing.assert_close(
                    torch.tensor(got["per_sample"], dtype=torch.float64),
                    values.float().sort().values.double(),
                    atol=1e-6,
                    rtol=0,
                )
