"""Bad input gets a clear error naming the argument and the expected form — one row per case of the
Troubleshooting table in README.md (keep the two in sync)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

from fragdefense.attacks import attack_interpretation, pgd_attack
from fragdefense.attributions import attribute
from fragdefense.cli._config import compose_config
from fragdefense.data import CIFAR10DataModule, ImageFolderDataModule
from fragdefense.metrics.functional import spearman, topk_intersection
from fragdefense.models import create_model, load_checkpoint_model, load_weights
from fragdefense.regularizers import create_regularizer

_NET = create_model("small_cnn", num_classes=10, width=8).eval()
_X = torch.rand(2, 3, 32, 32)
_Y = torch.tensor([0, 1])


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


@pytest.mark.parametrize("row,call,exc,match", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(row, call, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_readme_troubleshooting_table_lists_every_row():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1]
    for row, *_ in ROWS:
        assert f"| {row} |" in section, f"README Troubleshooting lacks the row {row!r}"


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
