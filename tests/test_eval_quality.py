"""Explanation scores and robust accuracy as evaluation cells and torchmetrics classes."""

from __future__ import annotations

import pytest
import torch

import fragdefense.metrics as M
from fragdefense.attacks.robust_accuracy import robust_accuracy
from fragdefense.evaluation import CellStore
from fragdefense.evaluation.quality import check_scores, run_quality, run_robust_accuracy
from fragdefense.metrics.faithfulness import deletion_auc, faithfulness_correlation
from fragdefense.metrics.registry import list_metrics
from fragdefense.metrics.robustness import make_explain
from fragdefense.models import create_model
from fragdefense.utils.conventions import image_seed, make_generator


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, width=4).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)


def _batches(x, y, bs):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)]


def test_every_explanation_score_has_a_class_with_the_registry_direction():
    names = list_metrics(kind="explanation")
    assert {"deletion_auc", "insertion_auc", "road_morf", "road_lerf", "max_sensitivity"} <= set(names)
    classes = {
        "max_sensitivity": M.MaxSensitivity,
        "avg_sensitivity": M.AvgSensitivity,
        "local_lipschitz_estimate": M.LocalLipschitzEstimate,
        "relative_input_stability": M.RelativeInputStability,
        "relative_output_stability": M.RelativeOutputStability,
        "relative_representation_stability": M.RelativeRepresentationStability,
        "deletion_auc": M.DeletionAUC,
        "insertion_auc": M.InsertionAUC,
        "faithfulness_correlation": M.FaithfulnessCorrelation,
    }
    from fragdefense.metrics.registry import get_metric

    for name, cls in classes.items():
        m = cls()
        assert m.score == name
        assert cls.higher_is_better == get_metric(name).similarity, name
    assert M.ROAD(order="lerf").score == "road_lerf"
    with pytest.raises(ValueError, match="`order`"):
        M.ROAD(order="middle")
    with pytest.raises(ValueError, match="compares two maps"):
        M.ExplanationScore("spearman")


def test_class_mean_equals_the_functional_mean_over_updates(net, data):
    x, y = data
    m = M.DeletionAUC("saliency", per_sample=True, steps=8)
    for xb, yb in _batches(x, y, 4):
        m.update(net, xb, yb)
    explain = make_explain(net, "saliency")
    # per batch as the metric saw them (a different batch size can reorder near-tied map values)
    ref = torch.cat([deletion_auc(net, xb, yb, explain(xb, yb), steps=8) for xb, yb in _batches(x, y, 4)])
    torch.testing.assert_close(m.compute_per_sample(), ref.to(m.dtype), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.compute(), ref.mean(), atol=1e-6, rtol=1e-5)
    # the state is numbers only, reduced by sum (DDP-safe), and holds no model
    assert set(m._reductions) == {"sum", "count", "values"}
    assert not list(m.parameters())


def test_quality_cells_are_per_image_seeded_and_resumable(net, data, tmp_path):
    x, y = data
    opts = {"faithfulness_correlation": {"subset_size": 16, "n_runs": 6}, "deletion_auc": {"steps": 8}}
    scores = ["faithfulness_correlation", "deletion_auc"]

    def run(bs, store=None):
        return next(
            run_quality(
                net,
                _batches(x, y, bs),
                explainers=["saliency"],
                scores=scores,
                score_opts=opts,
                seed=3,
                require_correct=False,
                store=store,
            )
        )

    a, b = run(6), run(2)
    assert [r["image"] for r in a.rows] == list(range(6))
    for ra, rb in zip(a.rows, b.rows):
        for s in scores:
            assert ra[s] == pytest.approx(rb[s], abs=1e-6), (s, ra["image"])
    # the random score equals the functional form with the documented per-image seeds
    explain = make_explain(net, "saliency")
    gens = make_generator([image_seed(3, "saliency", "faithfulness_correlation", i) for i in range(6)], x.device)
    ref = faithfulness_correlation(net, x, y, explain(x, y), subset_size=16, n_runs=6, generator=gens)
    got = torch.tensor([r["faithfulness_correlation"] for r in a.rows])
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)
    # store: the second run reads the cell back
    store = CellStore(tmp_path, {"t": 1})
    first = run(3, store)
    again = run(3, CellStore(tmp_path, {"t": 1}))
    assert again.resumed and not first.resumed
    assert again.aggregate == pytest.approx(first.aggregate)


def test_quality_scores_only_correct_images_by_default(net, data):
    x, y = data
    res = next(
        run_quality(
            net, [(x, y)], explainers=["saliency"], scores=["deletion_auc"], score_opts={"deletion_auc": {"steps": 4}}
        )
    )
    correct = int((net(x).argmax(1) == y).sum())
    assert res.aggregate["n_images"] == correct
    assert res.aggregate["n_skipped"] == 6 - correct


def test_bad_scores_are_refused_before_work():
    with pytest.raises(ValueError, match="unknown explanation score 'spearman' in `scores`"):
        check_scores(["spearman"])
    with pytest.raises(ValueError, match="`score_opts` has options for 'road_morf'"):
        check_scores(["deletion_auc"], {"road_morf": {}})


def test_robust_cells_match_robust_accuracy_and_merge_shards(net, data, tmp_path):
    x, y = data
    y = net(x).argmax(1)  # every image correct: the attack runs on all
    res = next(run_robust_accuracy(net, [(x, y)], attacks=["pgd"], eps=["4/255"], steps=5, seed=0))
    direct = robust_accuracy(net, x, y, attack="pgd", eps="4/255", steps=5, seed=image_seed(0, "pgd", "4/255", 0))
    s = direct.summary()
    assert res.aggregate["clean_accuracy"] == pytest.approx(s["clean_accuracy"]) == 1.0
    assert res.aggregate["robust_accuracy"] == pytest.approx(s["robust_accuracy"])
    assert [r["robust_correct"] for r in res.rows] == direct.robust_correct.tolist()
    # two shards written by two ranks merge into one cell with the accuracies over all images
    halves = [(x[:3], y[:3], [0, 1, 2]), (x[3:], y[3:], [3, 4, 5])]
    for rank in (0, 1):
        st = CellStore(tmp_path, {"t": 2}, rank=rank, world_size=2)
        next(run_robust_accuracy(net, [halves[rank]], attacks=["pgd"], eps=["4/255"], steps=5, store=st))
    merged = CellStore(tmp_path, {"t": 2}, world_size=2).merge(res.cell)
    assert merged.aggregate["n_images"] == 6
    expect = sum(bool(r["robust_correct"]) for r in merged.rows) / 6
    assert merged.aggregate["robust_accuracy"] == pytest.approx(expect)
    with pytest.raises(ValueError, match="unknown label attack 'nope' in `attacks`"):
        next(run_robust_accuracy(net, [(x, y)], attacks=["nope"], eps=["4/255"]))


def test_fragility_monitor_logs_explanation_scores_when_asked(net, data):
    from fragdefense.callbacks import FragilityMonitor
    from fragdefense.evaluation import ExplainerSpec
    from fragdefense.evaluation.quality import run_quality_cell

    x, _ = data
    y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 4  # one misclassified probe image: not scored
    probe = {"x": x, "y": y, "mask": None, "indices": list(range(6))}
    off = FragilityMonitor(attacks=["random_sign"], steps=1, n_probe=6, progress=False)
    assert not any("quality" in n for n in off.metric_names(with_mask=False))
    mon = FragilityMonitor(
        attacks=["random_sign"],
        steps=1,
        n_probe=6,
        progress=False,
        explanation_scores=["deletion_auc"],
        score_opts={"deletion_auc": {"steps": 4}},
    )
    assert "fragility/saliency/quality/deletion_auc" in mon.metric_names(with_mask=False)
    rep = mon.evaluate(net, probe)
    ref = run_quality_cell(
        net,
        [(x, y, list(range(6)))],
        ExplainerSpec("saliency", "saliency"),
        ["deletion_auc"],
        score_opts={"deletion_auc": {"steps": 4}},
        seed=0,
    )
    assert ref.aggregate["n_images"] == 5
    assert rep.metrics["saliency/quality/deletion_auc"] == pytest.approx(ref.aggregate["deletion_auc"], abs=1e-6)
    with pytest.raises(ValueError, match="unknown explanation score 'nope'"):
        FragilityMonitor(explanation_scores=["nope"])
