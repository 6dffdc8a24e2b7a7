"""Model registry (timm style): ``create_model(name, **kw)`` and ``list_models()``.

Every model is wrapped in :class:`ImageClassifier`, which takes images in ``[0, 1]`` and normalises
inside the model, so attack budgets ``eps`` are always in pixel units of ``[0, 1]`` images. Besides the
registered names, any torchvision classifier is ``"torchvision.<name>"`` and any timm model ``"timm.<name>"``
(timm is optional: ``pip install timm``); nothing is ever downloaded. :func:`model_from_config` rebuilds a model
from what a checkpoint stores (registry arguments, or the Hydra ``_target_`` config of any ``nn.Module``).

>>> import torch
>>> from fragdefense.models import create_model, list_models
>>> "small_cnn" in list_models()
True
>>> model = create_model("small_cnn", num_classes=10)
>>> model(torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.models.batchnorm import double_backward_batchnorm_
from fragdefense.models.cifar import PreActResNet, ResNetCifar, SmallCNN, WideResNet
from fragdefense.models.outputs import OutputSelector, check_logits, with_output
from fragdefense.models.softplus import count_relus, relu_to_softplus_, set_softplus_beta, to_softplus
from fragdefense.models.surrogate import SoftplusSurrogate, softplus_surrogate

__all__ = [
    "ImageClassifier",
    "create_model",
    "list_models",
    "register_model",
    "to_softplus",
    "softplus_surrogate",
    "SoftplusSurrogate",
    "OutputSelector",
    "with_output",
    "check_logits",
    "relu_to_softplus_",
    "set_softplus_beta",
    "count_relus",
    "double_backward_batchnorm_",
    "load_checkpoint_model",
    "load_weights",
    "model_from_config",
    "model_config_for_checkpoint",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for images ``x`` in ``[0, 1]``; returns logits ``(B, num_classes)``.

    Attributes ``backbone``, ``num_classes`` and ``name`` are public; ``mean``/``std`` are buffers so
    they move with ``.to(device)`` and are stored in checkpoints.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        name: str = "custom",
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"`mean` and `std` must have one value per channel, got {len(mean)} and {len(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"`std` must be > 0 per channel, got {list(std)}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.name = name
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"`x` must have shape (B, {self.mean.shape[1]}, H, W) with pixels in [0, 1], got {tuple(x.shape)}"
            )
        return self.backbone((x - self.mean) / self.std)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TORCHVISION = ("squeezenet1_1", "squeezenet1_0", "resnet18", "resnet50", "vgg16", "vgg16_bn", "alexnet")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a backbone factory ``fn(num_classes, **kw) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


@register_model("small_cnn")
def _small_cnn(num_classes: int = 10, width: int = 32, in_channels: int = 3) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("resnet18_cifar")
def _resnet18_cifar(num_classes: int = 10, width: int = 64) -> nn.Module:
    return ResNetCifar(num_classes=num_classes, num_blocks=(2, 2, 2, 2), width=width)


@register_model("preact_resnet18")
def _preact_resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    return PreActResNet(num_classes=num_classes, num_blocks=(2, 2, 2, 2), width=width)


@register_model("wrn28_10")
def _wrn28_10(num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> nn.Module:
    return WideResNet(num_classes=num_classes, depth=depth, widen=widen, dropout=dropout)


def _torchvision_factory(tv_name: str) -> Callable[..., nn.Module]:
    def fn(num_classes: int = 1000, **kw: Any) -> nn.Module:
        import torchvision

        if "weights" in kw and kw["weights"] is not None:
            raise ValueError(
                "`weights` downloads from the internet and is not supported; pass `weights_path=` "
                "to a local state_dict file (e.g. from torchvision's download cache) instead"
            )
        kw.pop("weights", None)
        net = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kw)
        return _no_inplace_(net)

    return fn


def _no_inplace_(net: nn.Module) -> nn.Module:
    """Turn off every in-place activation (``inplace=True`` ReLU, SiLU, Hardswish, ...): in-place activations break
    double backprop (attacks through the map) and captum's DeepLift."""
    for m in net.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    return net


def _timm_factory(timm_name: str) -> Callable[..., nn.Module]:
    def fn(num_classes: int = 1000, **kw: Any) -> nn.Module:
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"model 'timm.{timm_name}' needs timm, an optional dependency: pip install timm") from e
        if kw.pop("pretrained", False):
            raise ValueError(
                "`pretrained=True` downloads from the internet and is not supported; pass `weights_path=` to a "
                "local weights file (.pth / .safetensors, e.g. from the Hugging Face cache) instead"
            )
        if not timm.is_model(timm_name):
            raise ValueError(
                f"unknown timm model {timm_name!r} (timm {timm.__version__}); see timm.list_models('<pattern>')"
            )
        return _no_inplace_(timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kw))

    return fn


for _n in _TORCHVISION:
    _REGISTRY[_n] = _torchvision_factory(_n)


def list_models() -> list[str]:
    """Registered model names (sorted). Any torchvision classification model is also available as
    ``"torchvision.<name>"`` and, with timm installed, any timm model as ``"timm.<name>"`` (e.g.
    ``"timm.resnet10t"``; ``timm.list_models()`` lists them).

    >>> list_models()[:3]
    ['alexnet', 'preact_resnet18', 'resnet18']
    """
    return sorted(_REGISTRY)


def _default_stats(
    name: str, backbone: nn.Module | None = None, in_chans: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name.startswith("timm."):  # the timm model's own preprocessing, else ImageNet's
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
        c = int(in_chans or len(mean))
        if len(mean) != c:  # e.g. in_chans=1: the channels' mean
            mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if name in _TORCHVISION or name.startswith("torchvision."):
        return IMAGENET_MEAN, IMAGENET_STD
    return CIFAR10_MEAN, CIFAR10_STD


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights_path: str | Path | None = None,
    strict: bool = True,
    softplus_beta: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build a registered model wrapped in :class:`ImageClassifier` (input in ``[0, 1]``).

    Args:
        name: a name from :func:`list_models`, ``"torchvision.<name>"`` for any torchvision model, or
            ``"timm.<name>"`` for any timm model (timm installed; created with ``pretrained=False``).
        num_classes: output classes.
        mean, std: per-channel normalisation applied inside the model (defaults: CIFAR-10 statistics for
            the CIFAR architectures, ImageNet statistics for torchvision architectures, the ``pretrained_cfg``
            mean / std of a timm model, else ImageNet's).
        weights_path: optional local file holding either a full ``ImageClassifier`` state dict, a
            Lightning checkpoint of one, or a plain backbone state dict (e.g. torchvision's ``.pth`` or a timm
            ``.safetensors`` / ``.pth``). Nothing is ever downloaded.
        strict: passed to ``load_state_dict``.
        softplus_beta: when set, every ``nn.ReLU`` is replaced by ``softplus(beta * z) / beta`` (a network
            trained with the ``softplus_beta`` regularizer is rebuilt this way from its checkpoint).
        **kwargs: forwarded to the architecture (e.g. ``width=64`` for ``small_cnn``).

    >>> create_model("resnet18_cifar", num_classes=100).num_classes
    100

    In-place activations are turned off (they break double backprop). A timm model, e.g. (timm installed)
    ``create_model("timm.resnet10t", num_classes=10)``, gets its ``pretrained_cfg`` normalisation.
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a model name string, got {type(name).__name__}")
    if name.startswith("torchvision."):
        factory = _torchvision_factory(name.split(".", 1)[1])
    elif name.startswith("timm."):
        factory = _timm_factory(name.split(".", 1)[1])
    elif name in _REGISTRY:
        factory = _REGISTRY[name]
    else:
        raise ValueError(
            f"unknown model `name`={name!r}; registered: {', '.join(list_models())} "
            "(or 'torchvision.<name>' for any torchvision classification model, 'timm.<name>' for any timm model)"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be an int >= 1, got {num_classes!r}")
    backbone = factory(num_classes=num_classes, **kwargs)
    dmean, dstd = _default_stats(name, backbone, kwargs.get("in_chans"))
    model = ImageClassifier(
        backbone,
        num_classes,
        mean=tuple(mean) if mean is not None else dmean,
        std=tuple(std) if std is not None else dstd,
        name=name,
    )
    if softplus_beta is not None:
        relu_to_softplus_(model, softplus_beta)
    if weights_path is not None:
        load_weights(model, weights_path, strict=strict)
    return model


def load_weights(model: ImageClassifier, path: str | Path, strict: bool = True) -> ImageClassifier:
    """Load a local weights file into ``model`` (see :func:`create_model` for accepted formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`weights_path` does not exist or is not a file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument name and the expected form
        raise ValueError(
            f"`weights_path` {path} is not a torch weights file ({type(e).__name__}: {e}); expected a state dict "
            "(.pth, .safetensors) or a Lightning checkpoint (.ckpt)"
        ) from e
    if isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoint
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, dict):
        raise ValueError(f"`weights_path` {path} does not hold a state dict (got {type(state).__name__})")
    target: nn.Module = model if any(k.startswith("backbone.") for k in state) else model.backbone
    try:
        target.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(
            f"`weights_path` {path} does not match model {model.name!r} "
            f"(num_classes={model.num_classes}): {str(e).splitlines()[0]} ..."
        ) from e
    return model


_CREATE_MODEL = "fragdefense.models.create_model"
#: ``model_config`` entries a regularizer adds (``Regularizer.model_config_update``) that are applied to any model
_POST_BUILD = ("softplus_beta",)


def model_config_for_checkpoint(node: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores (``hyper_parameters["model_config"]``) to rebuild the model of a resolved Hydra
    ``model`` config node: the :func:`create_model` arguments for ``_target_: fragdefense.models.create_model``,
    else ``{"instantiate": node}`` (the whole node, ``_target_`` included, for ``hydra.utils.instantiate``).

    >>> model_config_for_checkpoint({"_target_": "fragdefense.models.create_model", "name": "small_cnn", "width": 8})
    {'name': 'small_cnn', 'width': 8}
    >>> model_config_for_checkpoint({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    {'instantiate': {'_target_': 'torch.nn.Linear', 'in_features': 2, 'out_features': 3}}
    """
    node = dict(node)
    if node.get("_target_", _CREATE_MODEL) == _CREATE_MODEL:
        node.pop("_target_", None)
        return node
    return {"instantiate": node}


def model_from_config(model_config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model (untrained weights) from a stored ``model_config``: :func:`create_model` arguments
    (``{"name": ..., **kw}``; ``weights_path`` is ignored, the checkpoint has the weights), or
    ``{"instantiate": <Hydra node with _target_>}`` for any ``nn.Module`` (built with ``hydra.utils.instantiate``;
    its module must be importable). ``softplus_beta`` (written by the ``softplus_beta`` regularizer) replaces the
    ReLUs as at training time.

    >>> model_from_config({"name": "small_cnn", "width": 4}).name
    'small_cnn'
    >>> model_from_config({"instantiate": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}})
    Linear(in_features=2, out_features=3, bias=True)
    """
    cfg = dict(model_config)
    if "instantiate" not in cfg:
        if "name" not in cfg:
            raise ValueError(
                f"`model_config` needs 'name' (create_model arguments) or 'instantiate' (a Hydra node with "
                f"_target_), got keys {sorted(cfg)}"
            )
        cfg.pop("weights_path", None)
        return create_model(**cfg)
    node = cfg.pop("instantiate")
    unknown = sorted(set(cfg) - set(_POST_BUILD))
    if unknown:
        raise ValueError(f"`model_config` has unknown keys {unknown} beside 'instantiate'; known: {list(_POST_BUILD)}")
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not target:
        raise ValueError(f"`model_config['instantiate']` must be a config with a `_target_`, got {node!r}")
    from hydra.utils import instantiate  # lazily: the model layer does not need Hydra otherwise

    try:
        model = instantiate(dict(node), _convert_="all")
    except Exception as e:  # noqa: BLE001 - re-raised with the target and what to do
        raise ValueError(
            f"cannot rebuild the model `_target_`={target!r} ({type(e).__name__}: {e}); its module must be "
            "importable here as it was at training time (installed, or on PYTHONPATH)"
        ) from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"`_target_`={target!r} built a {type(model).__name__}, expected an nn.Module")
    if cfg.get("softplus_beta") is not None:
        relu_to_softplus_(model, float(cfg["softplus_beta"]))
    return model


def load_checkpoint_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a ``fragdefense-train`` (or ``ClassifierModule``) checkpoint, in eval mode: the
    architecture from its stored ``model_config`` (:func:`model_from_config`: a registry model, or any
    ``nn.Module`` trained from a Hydra ``_target_`` config), the weights from its state dict.

    Raises ``ValueError`` when the file is not a fragdefense checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`checkpoint` does not exist or is not a file: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument name and the expected form
        raise ValueError(
            f"`checkpoint` {path} is not a torch checkpoint file ({type(e).__name__}: {e}); "
            "expected a .ckpt written by fragdefense-train"
        ) from e
    cfg = (ckpt.get("hyper_parameters") or {}).get("model_config") if isinstance(ckpt, dict) else None
    if not cfg or ("name" not in cfg and "instantiate" not in cfg):
        raise ValueError(
            f"`checkpoint` {path} has no stored model_config (not written by fragdefense-train or by a "
            "ClassifierModule given `model_config=`); use create_model(name, weights_path=...) instead"
        )
    model = model_from_config(cfg)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()
