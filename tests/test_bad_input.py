"""Bad input gets a clear error naming the argument and the expected form — one row per case of the
Troubleshooting table in README.md (keep the two in sync).

``ROWS`` holds the functional-core cases; ``CLI_ROWS`` one bad type and one bad range per argument of
``fragdefense-eval``, ``fragdefense-hessian`` and ``fragdefense-influence``, each run through the command's config
composition and its check function (``check_config``: the check that runs before the model and the data are
loaded), never a full run. ``test_every_cli_argument_has_rows`` makes the table grow with the commands' configs."""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image
from torch import nn

from fragdefense.attacks import attack_interpretation, pgd_attack
from fragdefense.attributions import attribute
from fragdefense.cli._config import compose_config
from fragdefense.data import CIFAR10DataModule, ImageFolderDataModule
from fragdefense.hessian import eigenvalues_vs_beta, input_hessian, map_change_along_directions, param_hessian
from fragdefense.hessian.summary import hessian_snapshot
from fragdefense.influence import (
    LastLayerInfluence,
    ParameterInfluence,
    attack_influence,
    fit_linear_head,
    influence_scores,
)
from fragdefense.metrics.functional import spearman, topk_intersection
from fragdefense.models import create_model, load_checkpoint_model, load_weights
from fragdefense.regularizers import InputGradient, create_regularizer, regularized_loss

torch.manual_seed(0)
_NET = create_model("small_cnn", num_classes=10, width=8).eval()
_X = torch.rand(2, 3, 32, 32)
_Y = torch.tensor([0, 1])
_SMALL = create_model("small_cnn", num_classes=10, width=4).eval()
_XS = torch.rand(2, 3, 8, 8)


@functools.cache
def _influence() -> tuple[nn.Module, LastLayerInfluence]:
    """Features of 3x4x4 images and an exact logistic-regression head on them (two classes)."""
    g = torch.Generator().manual_seed(0)
    feat = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.Tanh())
    xtr = torch.rand(24, 3, 4, 4, generator=g)
    ytr = (xtr.mean((1, 2, 3)) > 0.5).long()
    with torch.no_grad():
        phi = feat(xtr)
    w, b = fit_linear_head(phi, ytr, num_classes=2, binary=True, l2=0.1)
    return feat, LastLayerInfluence(w, b, l2=0.1).fit(phi, ytr)


def _attack_influence(x: torch.Tensor, y: torch.Tensor | None = None) -> object:
    feat, inf = _influence()
    return attack_influence(feat, inf, x, y, k=3)


def _image_tree(root: Path, corrupt: bool) -> Path:
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(d / f"{i}.jpg")
    if corrupt:
        (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _weights_file(tmp: Path) -> Path:
    p = tmp / "small_cnn.pt"
    torch.save(create_model("small_cnn", num_classes=10, width=8).state_dict(), p)
    return p


ROWS = [
    # (row id, callable(tmp_path), exception type, message pattern)
    (
        "images not 4-D",
        lambda t: attribute("saliency", _NET, torch.rand(3, 32, 32)),
        ValueError,
        r"`x` must have shape \(B, C, H, W\)",
    ),
    (
        "integer images",
        lambda t: attribute("saliency", _NET, (_X * 255).to(torch.uint8)),
        TypeError,
        "`x` must have a floating dtype",
    ),
    (
        "NaN images",
        lambda t: attribute("saliency", _NET, torch.full_like(_X, float("nan"))),
        ValueError,
        "`x` contains NaN or Inf",
    ),
    (
        "Inf images",
        lambda t: pgd_attack(_NET, torch.full_like(_X, float("inf")), _Y),
        ValueError,
        "`x` contains NaN or Inf",
    ),
    (
        "images outside [0, 1]",
        lambda t: attack_interpretation(_NET, _X * 2, _Y),
        ValueError,
        r"`x` must hold pixel values in \[0, 1\]",
    ),
    (
        "labels of the wrong shape",
        lambda t: pgd_attack(_NET, _X, torch.tensor([0])),
        ValueError,
        "`y` must be a LongTensor of shape",
    ),
    (
        "maps of different shapes",
        lambda t: spearman(torch.rand(2, 4, 4), torch.rand(2, 4, 5)),
        ValueError,
        "`a` and `b` must have the same shape",
    ),
    (
        "k <= 0",
        lambda t: topk_intersection(torch.rand(2, 4, 4), torch.rand(2, 4, 4), k=0),
        ValueError,
        "`k` must be >= 1 and <= 16",
    ),
    (
        "k > D",
        lambda t: topk_intersection(torch.rand(2, 4, 4), torch.rand(2, 4, 4), k=17),
        ValueError,
        "`k` must be >= 1 and <= 16",
    ),
    (
        "eps < 0",
        lambda t: attack_interpretation(_NET, _X, _Y, eps=-0.1),
        ValueError,
        "`eps` must be a finite number >= 0",
    ),
    (
        "unknown attribution method",
        lambda t: attribute("nope", _NET, _X),
        ValueError,
        "unknown attribution method `name`='nope'; registered:",
    ),
    (
        "unknown attack",
        lambda t: attack_interpretation(_NET, _X, _Y, attack="nope"),
        ValueError,
        "unknown `attack`='nope'; registered attacks: topk, mass_center",
    ),
    (
        "unknown regularizer",
        lambda t: create_regularizer("nope"),
        ValueError,
        "unknown regularizer `name`='nope'; registered:",
    ),
    ("unknown model", lambda t: create_model("nope"), ValueError, "unknown model `name`='nope'; registered:"),
    (
        "unknown config key",
        lambda t: compose_config("train", ["trainer.max_epoch=1"]),
        ConfigCompositionException,
        "trainer.max_epoch",
    ),
    (
        "unknown config option",
        lambda t: compose_config("train", ["regularizer=nope"]),
        MissingConfigException,
        "regularizer/nope",
    ),
    (
        "missing data root",
        lambda t: ImageFolderDataModule(root=str(t / "nowhere")).setup("fit"),
        FileNotFoundError,
        "`root` .* does not exist",
    ),
    (
        "CIFAR-10 not on disk",
        lambda t: CIFAR10DataModule(root=str(t / "c")).setup("fit"),
        FileNotFoundError,
        "CIFAR-10 .* was not found under `root`",
    ),
    (
        "corrupt image in an ImageFolder",
        lambda t: ImageFolderDataModule(
            root=str(_image_tree(t, True)), num_classes=2, image_size=8, batch_size=2
        ).setup("fit"),
        ValueError,
        "cannot read image file .*broken.jpg",
    ),
    (
        "checkpoint that does not match the model",
        lambda t: load_weights(create_model("resnet18_cifar", num_classes=10), _weights_file(t)),
        ValueError,
        "`weights_path` .* does not match model 'resnet18_cifar'",
    ),
    (
        "file that is not a checkpoint",
        lambda t: load_checkpoint_model(_image_tree(t, False) / "train" / "a" / "0.jpg"),
        ValueError,
        "`checkpoint` .* is not a torch checkpoint file",
    ),
    (
        "weights without a stored model config",
        lambda t: load_checkpoint_model(_weights_file(t)),
        ValueError,
        "has no stored model_config",
    ),
]


ROWS += [
    # --- training objective (regularized_loss): checked before the inner attack and the penalty ---------------------
    (
        "training images outside [0, 1]",
        lambda t: regularized_loss(_NET, InputGradient(weight=0.1), _X * 3, _Y),
        ValueError,
        r"`x` must hold pixel values in \[0, 1\]",
    ),
    (
        "empty training batch",
        lambda t: regularized_loss(_NET, InputGradient(weight=0.1), _X[:0], _Y[:0]),
        ValueError,
        "`x` must be a non-empty batch",
    ),
    (
        "training labels out of range",
        lambda t: regularized_loss(_NET, InputGradient(weight=0.1), _X, torch.tensor([0, 10])),
        ValueError,
        r"`y` must hold class labels in \[0, 9\], got min 0, max 10",
    ),
    (
        "label smoothing outside [0, 1]",
        lambda t: regularized_loss(_NET, None, _X, _Y, label_smoothing=1.5),
        ValueError,
        r"`label_smoothing` must be a finite number >= 0 and <= 1",
    ),
    # --- influence functions ---------------------------------------------------------------------------------------
    (
        "influence attack on an empty batch",
        lambda t: _attack_influence(torch.rand(0, 3, 4, 4)),
        ValueError,
        "`x` must be a non-empty batch",
    ),
    (
        "influence attack on images outside [0, 1]",
        lambda t: _attack_influence(torch.rand(2, 3, 4, 4) + 1),
        ValueError,
        r"`x` must hold pixel values in \[0, 1\]",
    ),
    (
        "influence attack with labels out of range",
        lambda t: _attack_influence(torch.rand(2, 3, 4, 4), torch.tensor([0, 2])),
        ValueError,
        r"`y` must hold class labels in \[0, 1\]",
    ),
    (
        "influence scores with labels out of range",
        lambda t: influence_scores(*_influence(), torch.rand(2, 3, 4, 4), torch.tensor([-1, 0])),
        ValueError,
        r"`y` must hold class labels in \[0, 1\]",
    ),
    (
        "parameter influence with labels out of range",
        lambda t: ParameterInfluence(_SMALL, params="backbone.head", damping=0.1).fit(_XS, torch.tensor([0, 10])),
        ValueError,
        r"`y_train` must hold class labels in \[0, 9\]",
    ),
    # --- Hessians --------------------------------------------------------------------------------------------------
    (
        "input Hessian of an empty batch",
        lambda t: input_hessian(_NET, _X[:0]),
        ValueError,
        "`x` must be a non-empty batch",
    ),
    (
        "input Hessian of images outside [0, 1]",
        lambda t: input_hessian(_NET, _X * 2),
        ValueError,
        r"`x` must hold pixel values in \[0, 1\]",
    ),
    (
        "input Hessian target out of range",
        lambda t: input_hessian(_NET, _X, target=10),
        ValueError,
        r"`target` must hold class labels in \[0, 9\]",
    ),
    (
        "input Hessian loss labels out of range",
        lambda t: input_hessian(_NET, _X, objective="loss", y=torch.tensor([0, 12])),
        ValueError,
        r"`y` must hold class labels in \[0, 9\]",
    ),
    (
        "Hessian probe target out of range",
        lambda t: map_change_along_directions(_NET, _X, torch.tensor([0, 11]), n_random=1, radii=(0.1,)),
        ValueError,
        r"`target` must hold class labels in \[0, 9\]",
    ),
    (
        "Hessian snapshot labels out of range",
        lambda t: hessian_snapshot(_NET, _X, torch.tensor([0, 10])),
        ValueError,
        r"`y` must hold class labels in \[0, 9\]",
    ),
    (
        "parameter Hessian of an empty batch",
        lambda t: param_hessian(_NET, data=(_X[:0], _Y[:0])),
        ValueError,
        "`x` must be a non-empty batch",
    ),
    (
        "softplus betas <= 0",
        lambda t: eigenvalues_vs_beta(_NET, _X, betas=(0.0, 10.0)),
        ValueError,
        "`betas` must be a finite number > 0",
    ),
]


@pytest.mark.parametrize("row,call,exc,match", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(row, call, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        call(tmp_path)


# --- every argument of the analysis commands: checked before the model and the data are loaded -------------------
_CLI_CONFIG = {"eval": "eval", "eval_compare": "eval_compare", "hessian": "hessian", "influence": "influence"}
_MODEL_KEYS = {"checkpoint", "checkpoints", "model_name", "weights_path", "run_dir"}
_NOFILE = "/nonexistent/fragdefense.ckpt"
T, V, F = TypeError, ValueError, FileNotFoundError
# command -> [(config key, override, exception)]: one bad type and, where the key has a range, one bad range
_COMMON = [
    ("seed", "seed=x", T),
    ("seed", "seed=-1", V),
    ("device", "device=3", T),
    ("device", "device=gpu", V),
    ("checkpoint", "checkpoint=3", T),
    ("checkpoint", f"checkpoint={_NOFILE}", F),
    ("model_name", "model_name=3", T),
    ("model_name", "model_name=nope", V),
    ("weights_path", "weights_path=3", T),
    ("weights_path", f"weights_path={_NOFILE}", F),
    ("model_kwargs", "model_kwargs=3", T),
]
_PROTOCOL = [
    ("protocol.steps", "protocol.steps=x", T),
    ("protocol.steps", "protocol.steps=0", V),
    ("protocol.step_size", "protocol.step_size=[1]", T),
    ("protocol.step_size", "protocol.step_size=-1", V),
    ("protocol.k", "protocol.k=x", T),
    ("protocol.k", "protocol.k=0", V),
    ("protocol.beta", "protocol.beta=x", T),
    ("protocol.beta", "protocol.beta=0", V),
    ("protocol.restarts", "protocol.restarts=1.5", T),
    ("protocol.restarts", "protocol.restarts=0", V),
    ("protocol.random_start", "protocol.random_start=maybe", T),
    ("protocol.criterion", "protocol.criterion=3", V),
    ("protocol.criterion", "protocol.criterion=nope", V),
    ("protocol.check_every", "protocol.check_every=x", T),
    ("protocol.check_every", "protocol.check_every=0", V),
    ("protocol.lens_window", "protocol.lens_window=x", T),
    ("protocol.lens_window", "protocol.lens_window=-1", V),
    ("protocol.reduce", "protocol.reduce=3", V),
    ("protocol.reduce", "protocol.reduce=max", V),
]
_CLI_BAD: dict[str, list[tuple[str, str, type]]] = {
    "eval": [
        *_COMMON,
        ("checkpoints", "checkpoints=3", T),
        ("checkpoints", f"checkpoints=[{_NOFILE}]", F),
        ("mode", "mode=3", V),
        ("mode", "mode=nope", V),
        ("n_images", "n_images=x", T),
        ("n_images", "n_images=0", V),
        ("batch_size", "batch_size=1.5", T),
        ("batch_size", "batch_size=0", V),
        ("num_workers", "num_workers=x", T),
        ("num_workers", "num_workers=-1", V),
        ("eps", "eps=[true]", T),
        ("eps", "eps=[-1]", V),
        ("attacks", "attacks=[1]", T),
        ("attacks", "attacks=[nope]", V),
        ("methods", "methods=3", T),
        ("methods", "methods=[nope]", V),
        ("figures", "figures=maybe", T),
        ("n_figure_images", "n_figure_images=x", T),
        ("n_figure_images", "n_figure_images=-1", V),
        ("save_images", "save_images=maybe", T),
        *_PROTOCOL,
        ("quality.scores", "quality.scores=[1]", T),
        ("quality.scores", "quality.scores=[spearman]", V),
        ("quality.opts", "quality.opts=3", T),
        ("quality.opts", "quality.opts={nope:{}}", V),
        ("robust_accuracy.attacks", "robust_accuracy.attacks=[1]", T),
        ("robust_accuracy.attacks", "robust_accuracy.attacks=[nope]", V),
        ("robust_accuracy.eps", "robust_accuracy.eps=[true]", T),
        ("robust_accuracy.eps", "robust_accuracy.eps=[-1]", V),
        ("robust_accuracy.norm", "robust_accuracy.norm=3", V),
        ("robust_accuracy.norm", "robust_accuracy.norm=l1", V),
        ("robust_accuracy.steps", "robust_accuracy.steps=x", T),
        ("robust_accuracy.steps", "robust_accuracy.steps=0", V),
        ("certify.enabled", "certify.enabled=maybe", T),
        ("certify.sigma", "certify.sigma=x", T),
        ("certify.sigma", "certify.sigma=0", V),
        ("certify.n0", "certify.n0=x", T),
        ("certify.n0", "certify.n0=0", V),
        ("certify.n", "certify.n=1.5", T),
        ("certify.n", "certify.n=0", V),
        ("certify.tau", "certify.tau=x", T),
        ("certify.tau", "certify.tau=0.4", V),
        ("certify.alpha", "certify.alpha=x", T),
        ("certify.alpha", "certify.alpha=2", V),
        ("certify.top_percent", "certify.top_percent=x", T),
        ("certify.top_percent", "certify.top_percent=0", V),
        ("certify.correction", "certify.correction=3", V),
        ("certify.correction", "certify.correction=sidak", V),
        ("certify.radii", "certify.radii=x", T),
        ("certify.radii", "certify.radii=[-1]", V),
        ("certify.reduce", "certify.reduce=3", V),
        ("certify.reduce", "certify.reduce=nope", V),
        ("certify.chunk_size", "certify.chunk_size=x", T),
        ("certify.chunk_size", "certify.chunk_size=0", V),
    ],
    "eval_compare": [
        ("timing", "timing=maybe", T),
        ("seed_check", "seed_check=maybe", T),
    ],
    "hessian": [
        *_COMMON,
        ("checkpoints", "checkpoints=3", T),
        ("checkpoints", f"checkpoints=[{_NOFILE}]", F),
        ("run_dir", f"run_dir={_NOFILE}", F),
        ("n_images", "n_images=x", T),
        ("n_images", "n_images=0", V),
        ("batch_size", "batch_size=x", T),
        ("batch_size", "batch_size=0", V),
        ("beta", "beta=x", T),
        ("beta", "beta=0", V),
        ("figures", "figures=maybe", T),
        ("compare.fragility", "compare.fragility=maybe", T),
        *[(f"{s}.enabled", f"{s}.enabled=maybe", T) for s in ("param", "directions", "beta_sweep", "fragility")],
        *[(f"{s}.tol", f"{s}.tol=x", T) for s in ("param", "directions", "beta_sweep", "fragility")],
        *[(f"{s}.tol", f"{s}.tol=0", V) for s in ("param", "directions", "beta_sweep", "fragility")],
        ("param.n_samples", "param.n_samples=x", T),
        ("param.n_samples", "param.n_samples=0", V),
        ("param.top_k", "param.top_k=x", T),
        ("param.top_k", "param.top_k=0", V),
        ("param.lanczos_iters", "param.lanczos_iters=x", T),
        ("param.lanczos_iters", "param.lanczos_iters=0", V),
        ("param.trace_matvecs", "param.trace_matvecs=x", T),
        ("param.trace_matvecs", "param.trace_matvecs=2", V),
        ("param.density_iters", "param.density_iters=x", T),
        ("param.density_iters", "param.density_iters=0", V),
        ("param.density_runs", "param.density_runs=x", T),
        ("param.density_runs", "param.density_runs=0", V),
        ("directions.radii", "directions.radii=[true]", T),
        ("directions.radii", "directions.radii=[0]", V),
        ("directions.k_eig", "directions.k_eig=x", T),
        ("directions.k_eig", "directions.k_eig=0", V),
        ("directions.n_random", "directions.n_random=x", T),
        ("directions.n_random", "directions.n_random=0", V),
        ("directions.topk", "directions.topk=x", T),
        ("directions.topk", "directions.topk=0", V),
        ("directions.max_iter", "directions.max_iter=x", T),
        ("directions.max_iter", "directions.max_iter=0", V),
        ("beta_sweep.betas", "beta_sweep.betas=[true]", T),
        ("beta_sweep.betas", "beta_sweep.betas=[0]", V),
        ("beta_sweep.objectives", "beta_sweep.objectives=[1]", T),
        ("beta_sweep.objectives", "beta_sweep.objectives=[nope]", V),
        ("beta_sweep.n_images", "beta_sweep.n_images=x", T),
        ("beta_sweep.n_images", "beta_sweep.n_images=0", V),
        ("beta_sweep.max_iter", "beta_sweep.max_iter=x", T),
        ("beta_sweep.max_iter", "beta_sweep.max_iter=0", V),
        ("fragility.objective", "fragility.objective=3", V),
        ("fragility.objective", "fragility.objective=nope", V),
        ("fragility.eps", "fragility.eps=[1]", T),
        ("fragility.eps", "fragility.eps=-1", V),
        ("fragility.steps", "fragility.steps=x", T),
        ("fragility.steps", "fragility.steps=0", V),
        ("fragility.step_size", "fragility.step_size=[1]", T),
        ("fragility.step_size", "fragility.step_size=-1", V),
        ("fragility.k", "fragility.k=x", T),
        ("fragility.k", "fragility.k=0", V),
        ("fragility.check_every", "fragility.check_every=x", T),
        ("fragility.check_every", "fragility.check_every=0", V),
        ("fragility.attack_beta", "fragility.attack_beta=x", T),
        ("fragility.attack_beta", "fragility.attack_beta=0", V),
        ("fragility.max_iter", "fragility.max_iter=x", T),
        ("fragility.max_iter", "fragility.max_iter=0", V),
    ],
    "influence": [
        *_COMMON,
        ("head", "head=3", T),
        ("classes", "classes=3", T),
        ("classes", "classes=[cat]", V),
        ("n_train", "n_train=x", T),
        ("n_train", "n_train=1", V),
        ("n_test", "n_test=x", T),
        ("n_test", "n_test=0", V),
        ("head_mode", "head_mode=3", V),
        ("head_mode", "head_mode=nope", V),
        ("l2", "l2=x", T),
        ("l2", "l2=-1", V),
        ("damping", "damping=x", T),
        ("damping", "damping=-1", V),
        ("test_label", "test_label=3", V),
        ("test_label", "test_label=maybe", V),
        ("batch_size", "batch_size=x", T),
        ("batch_size", "batch_size=0", V),
        ("attacks", "attacks=[1]", T),
        ("attacks", "attacks=[nope]", V),
        ("attack.eps", "attack.eps=[1]", T),
        ("attack.eps", "attack.eps=-1", V),
        ("attack.n_attacked", "attack.n_attacked=x", T),
        ("attack.n_attacked", "attack.n_attacked=0", V),
        ("attack.k", "attack.k=x", T),
        ("attack.k", "attack.k=2000", V),
        ("attack.steps", "attack.steps=x", T),
        ("attack.steps", "attack.steps=0", V),
        ("attack.rank_by", "attack.rank_by=3", V),
        ("attack.rank_by", "attack.rank_by=nope", V),
        ("figures", "figures=maybe", T),
        ("n_figure_images", "n_figure_images=x", T),
        ("n_figure_images", "n_figure_images=-1", V),
    ],
}
CLI_ROWS = [
    (
        f"fragdefense-eval --config-name {cli} {override}"
        if cli == "eval_compare"
        else f"fragdefense-{cli} {override}",
        cli,
        key,
        override,
        exc,
    )
    for cli, rows in _CLI_BAD.items()
    for key, override, exc in rows
]


@functools.cache
def _base_config(cli: str):
    from fragdefense.cli._config import compose_config

    return compose_config(_CLI_CONFIG[cli], [])


def _compose(cli: str, overrides: list[str]):
    """The command's config with ``overrides`` applied by Hydra's own override parser and applier (what
    ``compose`` does after building the defaults; composing from scratch for each of ~200 rows would take minutes
    on 2 CPU cores). ``test_fast_composition_matches_hydra_compose`` checks it against a full composition."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(_base_config(cli))
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides), cfg)
    return cfg


def _check(cli: str):
    from fragdefense.cli import evaluate, hessian, influence

    return {"eval": evaluate, "eval_compare": evaluate, "hessian": hessian, "influence": influence}[cli].check_config


@pytest.mark.parametrize("row,cli,key,override,exc", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_bad_cli_argument_row(row, cli, key, override, exc):
    """The error names the config key (and is raised by the check that runs before the model and data are loaded)."""
    model = [] if key in _MODEL_KEYS else ["model_name=small_cnn"]
    cfg = _compose(cli, [*model, override])
    with pytest.raises(exc, match=re.escape(f"`{key}`")):
        _check(cli)(cfg)


@pytest.mark.parametrize("cli", ["eval", "eval_compare", "hessian", "influence"])
def test_defaults_pass_and_a_model_source_is_required(cli):
    _check(cli)(_compose(cli, ["model_name=small_cnn"]))
    with pytest.raises(ValueError, match="give `checkpoint=<path to a fragdefense-train .ckpt>`"):
        _check(cli)(_compose(cli, []))


def test_every_cli_argument_has_rows():
    """Each key the commands check (and their configs hold) has a bad-input row: new keys need new rows."""
    from fragdefense.cli import evaluate, hessian, influence

    for cli, mod in (("eval", evaluate), ("hessian", hessian), ("influence", influence)):
        cfg = _base_config(cli)
        keys = {k for k in mod.config_spec() if _has(cfg, k)} | ({"methods"} if cli == "eval" else set())
        covered = {key for c, rows in _CLI_BAD.items() if c.startswith(cli) for key, *_ in rows}
        assert keys <= covered, f"fragdefense-{cli}: no bad-input row for {sorted(keys - covered)}"


def _has(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def test_fast_composition_matches_hydra_compose():
    from omegaconf import OmegaConf

    from fragdefense.cli._config import compose_config

    for cli, ov in (("eval", ["methods={saliency:{}}", "n_images=0"]), ("hessian", ["directions.radii=[0]"])):
        a, b = _compose(cli, ov), compose_config(_CLI_CONFIG[cli], ov)
        assert OmegaConf.to_yaml(a, resolve=False) == OmegaConf.to_yaml(b, resolve=False)


def test_readme_troubleshooting_table_lists_every_row():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    for row, *_ in ROWS:
        assert f"| {row} |" in section, f"README Troubleshooting lacks the row {row!r}"
    lines = section.splitlines()
    for cli in ("eval", "hessian", "influence"):
        line = next((ln for ln in lines if ln.startswith(f"| fragdefense-{cli} arguments |")), None)
        assert line is not None, f"README Troubleshooting lacks the row 'fragdefense-{cli} arguments'"
        for c, rows in _CLI_BAD.items():
            for key, *_ in rows if c.startswith(cli) else ():
                assert f"`{key}`" in line, f"README row 'fragdefense-{cli} arguments' does not list `{key}`"


# --- fragdefense-eval: a `methods` override replaces the default set -------------------------------------------
@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], ["saliency", "integrated_gradients"]),
        (["methods={saliency:{}}"], ["saliency"]),
        (["methods=[saliency]"], ["saliency"]),
        (["+methods={saliency:{}}"], ["saliency"]),
        (["methods={integrated_gradients:{steps:4}}"], ["integrated_gradients"]),
        (["~methods", "+methods={saliency:{}}"], ["saliency"]),
        (["default_methods.integrated_gradients.steps=8"], ["saliency", "integrated_gradients"]),
    ],
)
def test_eval_methods_override_replaces_the_default_set(overrides, expected):
    """``fragdefense-eval 'methods={saliency:{}}'`` used to run integrated_gradients too (Hydra merged the dict
    into the default one); composed by Hydra exactly as on the command line, then resolved by the command."""
    from fragdefense.cli._config import compose_config
    from fragdefense.cli.evaluate import check_config, resolve_methods

    cfg = compose_config("eval", ["model_name=small_cnn", *overrides])
    assert list(resolve_methods(cfg)) == expected
    specs = check_config(cfg)["specs"]
    assert list(specs) == expected
    if "integrated_gradients" in expected:
        steps = 4 if "steps:4" in str(overrides) else 8 if "steps=8" in str(overrides) else 32
        assert specs["integrated_gradients"].opts == {"steps": steps}


# --- FragilityMonitor: counts beside every figure, progress while it runs --------------------------------------
def _monitor_probe():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        pred = net(x).argmax(1)
    return net, {"x": x, "y": pred, "mask": None, "indices": list(range(6))}


def test_monitor_summary_shows_perturbed_over_attacked_beside_each_figure():
    from fragdefense.callbacks import FragilityMonitor
    from fragdefense.callbacks.fragility import _cell_text

    net, probe = _monitor_probe()
    mon = FragilityMonitor(attacks=["random_sign", "topk"], steps=2, check_every=1, k=20, progress=False)
    mon.final = mon.evaluate(net, probe)
    for attack, v in mon.summary()["methods"]["saliency"]["attacks"].items():
        rows = [r for r in mon.final.records if r["attack"] == attack]
        n_pert = sum(bool(r["perturbed"]) for r in rows)
        assert v["n_attacked"] == len(rows) == 6 and v["n_perturbed"] == n_pert
        if n_pert:
            count = f"({n_pert} perturbed / 6 attacked)"
            assert v["text"].count(count) == 2, v["text"]  # beside the top-k figure and beside Spearman
            assert "nan" not in v["text"]
    # no probe image at all: said, not NaN
    assert _cell_text({"n_attacked": 0}, float("nan"), 20) == (
        "no probe image evaluated (the probe set is empty): nothing measured"
    )
    # a missing figure is "not measured", never "nan"
    text = _cell_text({"n_attacked": 2, "perturbed_rate": 0.5, "acc_attacked": 0.5, "spearman": math.nan}, 1.0, 9)
    assert "Spearman not measured (1 perturbed / 2 attacked)" in text and "nan" not in text


def test_monitor_reports_progress_per_cell_rate_limited(monkeypatch):
    import lightning.pytorch.utilities as lpu

    from fragdefense.callbacks import FragilityMonitor

    lines: list[str] = []
    monkeypatch.setattr(lpu, "rank_zero_info", lambda msg, *a, **k: lines.append(str(msg)))
    net, probe = _monitor_probe()
    kw = {"attacks": ["random_sign", "topk"], "steps": 1, "k": 20, "batch_size": 3}
    FragilityMonitor(**kw, progress_interval=0.0).evaluate(net, probe)
    # two cells x two batches: a line per batch (interval 0) and one per finished cell
    assert [ln.split(";")[0] for ln in lines] == [
        "FragilityMonitor: cell 1/2 (saliency / random_sign / eps 8/255): 3/6 images",
        "FragilityMonitor: cell 1/2 (saliency / random_sign / eps 8/255): 6/6 images",
        f"FragilityMonitor: cell 1/2 (saliency / random_sign / eps 8/255) done, {_perturbed(lines, 2)}",
        "FragilityMonitor: cell 2/2 (saliency / topk / eps 8/255): 3/6 images",
        "FragilityMonitor: cell 2/2 (saliency / topk / eps 8/255): 6/6 images",
        f"FragilityMonitor: cell 2/2 (saliency / topk / eps 8/255) done, {_perturbed(lines, 5)}",
    ]
    assert all(re.search(r"; \d+ s elapsed$", ln) for ln in lines)
    lines.clear()
    FragilityMonitor(**kw).evaluate(net, probe)  # default 10 s: only the last cell's line in a fast evaluation
    assert len(lines) == 1 and lines[0].startswith("FragilityMonitor: cell 2/2")
    lines.clear()
    FragilityMonitor(**kw, progress=False).evaluate(net, probe)
    assert lines == []
    with pytest.raises(ValueError, match="`progress_interval`"):
        FragilityMonitor(progress_interval=-1)


def _perturbed(lines: list[str], i: int) -> str:
    m = re.search(r"done, (\d+ perturbed / 6 attacked)", lines[i])
    assert m, lines[i]
    return m.group(1)


# --- float64 images run end to end, in the model's dtype ------------------------------------------------------
def test_float64_images_in_regularizer_influence_and_hessian():
    from fragdefense.hessian import input_top_eigen

    x64 = _X.double()
    reg = InputGradient(weight=0.1)
    a, b = regularized_loss(_NET, reg, x64, _Y), regularized_loss(_NET, reg, _X, _Y)
    torch.testing.assert_close(a.loss, b.loss)  # the same float32 computation (rtol 1.3e-6)
    xi = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r64, r32 = _attack_influence(xi.double()), _attack_influence(xi)
    torch.testing.assert_close(r64.influence_clean, r32.influence_clean)
    torch.testing.assert_close(r64.x_adv, r32.x_adv)
    v = torch.randn(2, 3 * 8 * 8, generator=torch.Generator().manual_seed(2))
    op64, op32 = input_hessian(_SMALL, _XS.double(), 1), input_hessian(_SMALL, _XS, 1)
    assert op64.dtype == torch.float32
    torch.testing.assert_close(op64(v), op32(v))
    e64 = input_top_eigen(_SMALL, _XS.double(), 1, max_iter=5, generator=0).eigenvalues
    torch.testing.assert_close(e64, input_top_eigen(_SMALL, _XS, 1, max_iter=5, generator=0).eigenvalues)
    s64 = hessian_snapshot(_SMALL, _XS.double(), _Y, trace_matvecs=3, lanczos_iters=3, input_iters=3)
    s32 = hessian_snapshot(_SMALL, _XS, _Y, trace_matvecs=3, lanczos_iters=3, input_iters=3)
    assert s64 == pytest.approx(s32, rel=1e-5)
    f64 = ParameterInfluence(_SMALL, params="backbone.head", damping=0.1).fit(_XS.double(), _Y)
    assert f64.train_gradients.dtype == torch.float32


# --- argument checks of the shared conventions (reliability, second round) -------------------------------------
def test_pgd_labels_empty_batch_weight_and_normalize_are_checked():
    import torch
    from torch import nn

    from fragdefense.attacks import pgd_attack
    from fragdefense.attributions import to_map
    from fragdefense.regularizers import InputGradient

    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 2\], got \[0, 3\]"):
        pgd_attack(net, x, torch.tensor([0, 3]), steps=1)
    with pytest.raises(TypeError, match="integer class labels"):
        pgd_attack(net, x, torch.tensor([0.5, 1.0]), steps=1)
    with pytest.raises(ValueError, match="non-empty batch"):
        pgd_attack(net, x[:0], torch.zeros(0, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match=r"`weight` must be a number >= 0 \(finite\)"):
        InputGradient(weight=float("nan"))
    with pytest.raises(TypeError, match="`normalize` must be True or False"):
        to_map(torch.rand(1, 3, 2, 2), normalize="no")


def test_float64_images_run_in_the_model_dtype():
    """float64 images on a float32 model used to fail inside the first layer ("expected scalar type Double")."""
    import torch

    from fragdefense.attacks import attack_interpretation, pgd_attack
    from fragdefense.attributions import attribute
    from fragdefense.models import create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=3, width=4).eval()
    x64 = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(attribute("saliency", net, x64), attribute("saliency", net, x64.float()))
    a = attack_interpretation(net, x64, steps=2, k=10)
    b = attack_interpretation(net, x64.float(), steps=2, k=10)
    torch.testing.assert_close(a.x_adv, b.x_adv)
    assert pgd_attack(net, x64, torch.tensor([0, 1]), steps=1, generator=0).shape == x64.shape


def test_train_monitor_methods_override_replaces_the_default_set():
    from fragdefense.cli._config import compose_config

    cfg = compose_config("train", ["callbacks=fragility", "callbacks.fragility.methods={saliency:{}}"])
    assert list(cfg.callbacks.fragility.methods) == ["saliency"]
    from hydra.utils import instantiate

    assert list(instantiate(cfg.callbacks.fragility).methods) == ["saliency"]
    default = instantiate(compose_config("train", ["callbacks=fragility"]).callbacks.fragility)
    assert list(default.methods) == ["saliency", "integrated_gradients"]
    assert list(
        instantiate(
            compose_config("train", ["callbacks.fragility.methods=[input_x_gradient]"]).callbacks.fragility
        ).methods
    ) == ["input_x_gradient"]
