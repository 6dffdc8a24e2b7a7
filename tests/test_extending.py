"""Extensions registered from outside the package (tests/ext_plugin.py: a model, an attack, a metric, a defense
and an explainer, each one function or class plus its registration) run through fragdefense-train with a
FragilityMonitor and through fragdefense-eval, loaded by ``plugins=[ext_plugin]``."""

from __future__ import annotations

import json

import pytest

from fragdefense.cli._config import compose_config
from fragdefense.cli.evaluate import evaluate
from fragdefense.cli.train import train


@pytest.fixture
def registered():
    """Import the plugin (its registrations run), and undo every registration afterwards so that other tests see
    the built-in registries only."""
    import sys

    import ext_plugin  # noqa: F401 - registers the extensions (the commands import it again by name)

    from fragdefense.attacks import list_attacks, unregister_attack
    from fragdefense.attributions import list_attributions, unregister_attribution
    from fragdefense.metrics.registry import list_metrics, unregister_metric
    from fragdefense.models import _REGISTRY as MODELS
    from fragdefense.models import list_models
    from fragdefense.regularizers import REGULARIZERS, list_regularizers

    assert "ext_net" in list_models() and "ext_spread" in list_attacks() and "ext_l1" in list_metrics()
    assert "ext_grad_sq" in list_attributions() and "ext_logit_penalty" in list_regularizers()
    yield
    unregister_attack("ext_spread")
    unregister_attribution("ext_grad_sq")
    unregister_metric("ext_l1")
    MODELS.pop("ext_net", None)
    REGULARIZERS.pop("ext_logit_penalty", None)
    sys.modules.pop("ext_plugin", None)


def test_extensions_run_through_train_monitor_and_eval(tmp_path, registered, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "plugins=[ext_plugin]",
            "model.name=ext_net",
            "model.width=8",
            "+regularizer._target_=ext_plugin.ExtLogitPenalty",
            "+regularizer.weight=0.01",
            "callbacks.fragility.methods={ext_grad_sq:{}}",  # replaces the default set (default_methods)
            "callbacks.fragility.attacks=[random_sign,ext_spread]",
            "callbacks.fragility.n_probe=4",
            "callbacks.fragility.steps=2",
            "callbacks.fragility.check_every=1",
            "callbacks.fragility.k=20",
            "data.n_train=640",
            "data.n_test=64",
            "data.batch_size=32",
            "data.probe_size=4",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"run_dir={run}",
        ],
    )
    summary = train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    frag = metrics["fragility"]
    text = json.dumps(frag)
    # the monitor ran the plugin explainer under the plugin attack and reported the plugin metric
    assert "ext_grad_sq" in text and "ext_spread" in text and "ext_l1" in text, text[:500]
    assert summary["regularizer"] == "ext_logit_penalty"

    out = tmp_path / "eval"
    ecfg = compose_config(
        "eval",
        [
            "plugins=[ext_plugin]",
            f"checkpoint={summary['best_checkpoint']}",
            f"out_dir={out}",
            "~methods",
            "+methods={ext_grad_sq:{}}",
            "attacks=[ext_spread]",
            "eps=[8/255]",
            "n_images=32",
            "protocol.steps=2",
            "protocol.k=20",
            "figures=false",
            "data.n_train=640",
            "data.n_test=64",
        ],
    )
    payload = evaluate(ecfg)
    recs = payload["records"]
    assert recs and all(r["method"] == "ext_grad_sq" and r["attack"] == "ext_spread" for r in recs)
    attacked = [r for r in recs if r.get("n_images", 0) > 0]
    assert attacked and all("ext_l1" in r for r in attacked)


def test_unknown_plugin_fails_before_work(tmp_path):
    cfg = compose_config("eval", ["plugins=[no_such_plugin_module]", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="`plugins` entry 'no_such_plugin_module'"):
        evaluate(cfg)
    assert not any(tmp_path.iterdir())


def test_timm_model_through_train_monitor_and_eval(tmp_path, monkeypatch):
    """A timm model (``timm.test_resnet``, no download) through fragdefense-train with the FragilityMonitor and
    through fragdefense-eval."""
    pytest.importorskip("timm")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "model.name=timm.test_resnet",
            "~model.width",
            "callbacks.fragility.n_probe=4",
            "callbacks.fragility.steps=2",
            "callbacks.fragility.check_every=1",
            "callbacks.fragility.k=20",
            "data.n_train=64",
            "data.n_test=32",
            "data.batch_size=32",
            "data.probe_size=4",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"run_dir={run}",
        ],
    )
    summary = train(cfg)
    frag = json.loads((run / "metrics.json").read_text())["fragility"]
    assert "saliency" in json.dumps(frag) and "topk" in json.dumps(frag)
    ecfg = compose_config(
        "eval",
        [
            f"checkpoint={summary['best_checkpoint']}",
            f"out_dir={tmp_path / 'eval'}",
            "~methods",
            "+methods={saliency:{}}",
            "attacks=[random_sign]",
            "eps=[8/255]",
            "n_images=8",
            "figures=false",
            "data.n_train=64",
            "data.n_test=32",
        ],
    )
    payload = evaluate(ecfg)
    assert payload["records"] and payload["records"][0]["attack"] == "random_sign"
