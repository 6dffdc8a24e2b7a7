"""Your own data and model everywhere: monitors on any datamodule / dataloader and any LightningModule, timm models
in the registry, checkpoints of a custom ``_target_`` model in every loader. Real torch / Lightning / timm / Hydra."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from helpers_custom_model import NetModule, ReluNet, TinyCNN, TinyDataModule, TrainOnlyDataModule, random_images
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fragdefense.attributions import attribute
from fragdefense.callbacks import FragilityMonitor, HessianMonitor, InfluenceMonitor
from fragdefense.callbacks._probe import find_probe, images_from, resolve_network
from fragdefense.cli._config import compose_config
from fragdefense.lit import ClassifierModule
from fragdefense.models import (
    IMAGENET_MEAN,
    create_model,
    load_checkpoint_model,
    model_config_for_checkpoint,
    model_from_config,
)

TRAINER_KW = {
    "max_epochs": 1,
    "limit_train_batches": 2,
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
FRAG_KW = {"attacks": ["random_sign"], "n_probe": 6, "steps": 2, "check_every": 1, "k": 20, "maps_png": None}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- monitors on any data and any LightningModule ---------------------------------------------------------------
def test_fragility_monitor_on_a_plain_datamodule_and_a_custom_model(tmp_path):
    torch.manual_seed(0)
    dm = TinyDataModule()
    mon = FragilityMonitor(**FRAG_KW)
    trainer = L.Trainer(callbacks=[mon], default_root_dir=tmp_path, **TRAINER_KW)
    trainer.fit(ClassifierModule(TinyCNN(), num_classes=10), datamodule=dm)
    rep = mon.final
    assert rep is not None and rep.n_probe == 6
    assert "fragility/saliency/random_sign/spearman" in trainer.callback_metrics
    assert 0.0 <= rep.metrics["probe_acc"] <= 1.0
    # the probe is the first 6 images of val_dataloader()
    dm.setup()
    assert torch.equal(mon._probe["x"], dm.val_ds.tensors[0][:6]) and mon._probe["mask"] is None
    assert mon.summary()["n_probe"] == 6


def test_fragility_monitor_with_a_dataloader_probe_and_an_own_lightning_module(tmp_path):
    """No datamodule: plain dataloaders for fit, a DataLoader as ``probe=``, the network at ``pl_module.net``."""
    torch.manual_seed(0)
    x, y = random_images(48, seed=3)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    probe = DataLoader(TensorDataset(*random_images(10, seed=4)), batch_size=4, shuffle=True)
    mon = FragilityMonitor(**FRAG_KW, probe=probe, model="net")
    trainer = L.Trainer(callbacks=[mon], default_root_dir=tmp_path, **TRAINER_KW)
    module = NetModule(TinyCNN())
    trainer.fit(module, train_dataloaders=train)
    assert mon.final is not None and mon.final.n_probe == 6
    assert "fragility/saliency/random_sign/label_kept_rate" in trainer.callback_metrics
    again = images_from(probe, 6, owner="FragilityMonitor")  # seeded: the same shuffled images every time
    assert torch.equal(mon._probe["x"], again["x"])
    # without probe=: the val dataloaders given to fit
    mon2 = FragilityMonitor(**FRAG_KW, model=lambda m: m.net)
    val = DataLoader(TensorDataset(*random_images(8, seed=5)), batch_size=8)
    L.Trainer(callbacks=[mon2], default_root_dir=tmp_path, **TRAINER_KW).fit(NetModule(TinyCNN()), train, val)
    assert torch.equal(mon2._probe["x"], val.dataset.tensors[0][:6])


def test_influence_and_hessian_monitors_on_a_plain_datamodule(tmp_path):
    torch.manual_seed(0)
    inf = InfluenceMonitor(n_probe=3, n_train=20, k=3, n_images_logged=0, attacks=["random_sign"])
    hes = HessianMonitor(
        n_param_samples=4, n_input=2, lanczos_iters=4, trace_matvecs=3, input_iters=4, history_json=None
    )
    trainer = L.Trainer(callbacks=[inf, hes], default_root_dir=tmp_path, **TRAINER_KW)
    trainer.fit(ClassifierModule(TinyCNN(), num_classes=10), datamodule=TinyDataModule())
    assert "influence/random_sign/spearman" in trainer.callback_metrics
    assert "hessian/param_top_eig" in trainer.callback_metrics and len(hes.history) == 1
    assert inf._data["x_train"].shape == (20, 3, 16, 16) and inf._data["probe"]["x"].shape[0] == 3
    assert hes._probe[0].shape[0] == 4


def test_probe_source_order_seeding_and_errors(tmp_path):
    dm = TrainOnlyDataModule()  # no val / test loader: the (shuffled) train loader is read, seeded
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path)
    dm.trainer, trainer.datamodule = trainer, dm  # as fit() attaches it
    dm.setup()
    s = torch.random.get_rng_state()
    a = find_probe(trainer, n=5, seed=7, owner="FragilityMonitor")
    b = find_probe(trainer, n=5, seed=7, owner="FragilityMonitor")
    assert torch.equal(a["x"], b["x"]) and torch.equal(torch.random.get_rng_state(), s)  # training RNG untouched
    assert not torch.equal(a["x"], dm.train_ds.tensors[0][:5])  # shuffled: really from the train loader
    # a loader's own generator is seeded while read and restored afterwards
    g = torch.Generator().manual_seed(123)
    loader = DataLoader(dm.train_ds, batch_size=8, shuffle=True, generator=g)
    state = g.get_state()
    assert torch.equal(images_from(loader, 4, seed=1)["y"], images_from(loader, 4, seed=1)["y"])
    assert torch.equal(g.get_state(), state)
    # already-normalised data: a clear error naming the monitor
    bad = TinyDataModule(normalise=True)
    mon = FragilityMonitor(**FRAG_KW)
    with pytest.raises(ValueError, match=r"FragilityMonitor: the probe images must be .* \[0, 1\].*normalised"):
        L.Trainer(callbacks=[mon], default_root_dir=tmp_path, **TRAINER_KW).fit(
            ClassifierModule(TinyCNN(), num_classes=10), datamodule=bad
        )
    with pytest.raises(ValueError, match=r"InfluenceMonitor: the training images"):
        InfluenceMonitor(train_data=(torch.rand(4, 3, 8, 8) * 3, torch.zeros(4)))._get_data(trainer)
    with pytest.raises(RuntimeError, match="HessianMonitor found no probe images"):
        HessianMonitor()._get_probe(L.Trainer(logger=False))
    with pytest.raises(TypeError, match="attribute path"):
        FragilityMonitor(model=3)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        resolve_network(NetModule(TinyCNN()), "net.nope", "FragilityMonitor")


# --- timm models in the registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm.resnet10t", "timm.test_efficientnet"])
def test_timm_model_forward_saliency_and_double_backprop(name):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    assert model.name == name and torch.allclose(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert not any(getattr(m, "inplace", None) is True for m in model.modules())  # double backprop
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert model(x).shape == (2, 10)
    sal = attribute("saliency", model, x, create_graph=True)
    assert sal.shape[0] == 2 and torch.isfinite(sal).all()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(sal.abs().sum(), [x, *params], allow_unused=True)  # through the map: second order
    assert all(torch.isfinite(t).all() for t in g if t is not None)
    assert sum(float(t.abs().sum()) for t in g[1:] if t is not None) > 0


def test_timm_stats_weights_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    m = create_model("timm.test_resnet", num_classes=3)
    assert m.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # its pretrained_cfg, not ImageNet's
    assert create_model("timm.test_resnet", num_classes=3, in_chans=1).in_channels == 1
    save_file(m.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    m2 = create_model("timm.test_resnet", num_classes=3, weights_path=tmp_path / "w.safetensors")
    assert _same_weights(m, m2)
    with pytest.raises(ValueError, match="pretrained=True"):
        create_model("timm.resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="unknown timm model 'nope'"):
        create_model("timm.nope")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        create_model("timm.resnet10t")


# --- checkpoints of a custom `_target_` model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """fragdefense-train with ``model`` a Hydra ``_target_`` of a user's nn.Module, one training step."""
    from fragdefense.cli.train import train

    run_dir = tmp_path_factory.mktemp("custom_run")
    cfg = compose_config(
        "train",
        [
            f"run_dir={run_dir}",
            "data.n_train=64",
            "data.n_test=16",
            "data.batch_size=32",
            "data.probe_size=4",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "callbacks=none",
            "+callbacks.last_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.last_checkpoint.dirpath={run_dir}/checkpoints",
            "+callbacks.last_checkpoint.filename=last",
            "test=false",
        ],
    )
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"_target_": "helpers_custom_model.TinyCNN", "num_classes": 10, "width": 4})
    summary = train(cfg)
    assert summary["model"] == "helpers_custom_model.TinyCNN"
    return run_dir / "checkpoints" / "last.ckpt"


def test_custom_target_checkpoint_loads_everywhere(custom_run, tmp_path):
    from fragdefense.cli._common import load_model

    ckpt = torch.load(custom_run, weights_only=False)
    assert ckpt["hyper_parameters"]["model_config"] == {
        "instantiate": {"_target_": "helpers_custom_model.TinyCNN", "num_classes": 10, "width": 4}
    }
    model = load_checkpoint_model(custom_run)
    assert isinstance(model, TinyCNN) and not model.training
    torch.manual_seed(123)
    TinyCNN(num_classes=10, width=4)  # building the model draws its initial weights from the global RNG ...
    expected = torch.random.get_rng_state()
    torch.manual_seed(123)
    module = ClassifierModule.load_from_checkpoint(custom_run)
    assert torch.equal(torch.random.get_rng_state(), expected)  # ... but loading does not set the training RNGs
    assert isinstance(module.model, TinyCNN) and module.num_classes == 10 and _same_weights(module.model, model)
    cli_model = load_model(OmegaConf.create({"checkpoint": str(custom_run)}), None)  # eval / influence CLIs
    assert _same_weights(cli_model, model)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(cli_model(x), model(x))


def test_custom_target_checkpoint_in_the_eval_cli(custom_run, tmp_path):
    from fragdefense.cli.evaluate import evaluate

    cfg = compose_config(
        "eval",
        [
            f"out_dir={tmp_path}",
            f"checkpoint={custom_run}",
            "n_images=6",
            "attacks=[random_sign]",
            "eps=[8/255]",
            "methods={saliency:{}}",
            "protocol.steps=2",
            "protocol.k=20",
            "figures=false",
            "data.n_train=16",
            "data.n_test=32",
        ],
    )
    payload = evaluate(cfg)
    assert payload["records"] and payload["records"][0]["method"] == "saliency"


def test_registry_checkpoint_load_from_checkpoint(tmp_path):
    net = create_model("small_cnn", num_classes=10, width=4)
    module = ClassifierModule(net, 10, model_config={"name": "small_cnn", "num_classes": 10, "width": 4})
    trainer = L.Trainer(**{**TRAINER_KW, "limit_val_batches": 0}, default_root_dir=tmp_path)
    x, y = random_images(32, seed=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ClassifierModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.model.name == "small_cnn" and _same_weights(loaded.model, module.model)
    with pytest.raises(ValueError, match="`model` .* or `model_config`"):
        ClassifierModule(num_classes=10)


def test_model_config_round_trip_softplus_and_errors():
    node = {"_target_": "helpers_custom_model.ReluNet", "num_classes": 3}
    cfg = {**model_config_for_checkpoint(node), "softplus_beta": 5.0}  # as the softplus_beta regularizer stores it
    net = model_from_config(cfg)
    assert isinstance(net, ReluNet) and not any(isinstance(m, nn.ReLU) for m in net.modules())
    with pytest.raises(ValueError, match="importable"):
        model_from_config({"instantiate": {"_target_": "no_such_module.Net"}})
    with pytest.raises(ValueError, match="unknown keys"):
        model_from_config({"instantiate": node, "width": 3})
