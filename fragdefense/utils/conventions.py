"""One home for the conventions every family shares: budgets, step sizes, seeding and eval mode.

* **Budgets** (``eps``, ``step_size``) are in pixel units of ``[0, 1]`` images and may be given as numbers or
  as strings such as ``"8/255"``; :func:`parse_budget` reads them once, at the public entry point.
* **Step size**: when ``step_size`` is not given, every iterative attack (interpretation attacks, PGD, the inner
  maximisations of the training regularizers) uses :func:`default_step_size` ``= 2.5 * eps / steps``, the rule of
  Madry et al. ("Towards Deep Learning Models Resistant to Adversarial Attacks"): ``steps`` steps of that size
  can cross the ball 1.25 times.
* **Seeding**: every function that draws random numbers takes ``generator``: ``None`` (torch's global RNG), an
  ``int`` seed or a ``torch.Generator`` on the input's device; :func:`make_generator` turns it into a generator.
* **Eval mode**: :func:`eval_mode` puts a model in eval mode and restores *every* submodule's own flag afterwards
  (a submodule deliberately kept in eval mode inside a training model stays in eval mode).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import torch
from torch import nn

__all__ = [
    "Budget",
    "parse_budget",
    "default_step_size",
    "resolve_step_size",
    "make_generator",
    "image_seed",
    "randn",
    "rand",
    "eval_mode",
]


class Budget(float):
    """A budget in pixel units of ``[0, 1]`` images: a ``float`` that remembers how it was written.

    >>> b = Budget("8/255")
    >>> float(b) == 8 / 255, str(b)
    (True, '8/255')
    >>> Budget(0.5) + 0.25
    0.75
    """

    text: str

    def __new__(cls, value: Any, name: str = "eps") -> Budget:
        if isinstance(value, Budget):
            return value
        f = _parse(value, name)
        obj = super().__new__(cls, f)
        obj.text = value.strip() if isinstance(value, str) else f"{f:g}"
        return obj

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Budget({self.text!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # pickles / deep-copies as itself
        return (Budget, (self.text,))


def _parse(v: Any, name: str) -> float:
    if isinstance(v, bool):
        raise TypeError(f"`{name}` must be a number >= 0 or a fraction string like '8/255', got {v!r}")
    if isinstance(v, (int, float)) or isinstance(v, torch.Tensor) and v.numel() == 1:
        f = float(v)
    elif isinstance(v, str):
        s = v.strip()
        try:
            if "/" in s:
                num, den = s.split("/", 1)
                f = float(num) / float(den)
            else:
                f = float(Fraction(s))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"`{name}`={v!r} cannot be read as a number or a fraction string like '8/255'") from None
    else:
        raise TypeError(f"`{name}` must be a number >= 0 or a fraction string like '8/255', got {v!r}")
    if not (math.isfinite(f) and f >= 0.0):
        raise ValueError(f"`{name}` must be a finite number >= 0 (pixel units of [0, 1] images), got {v!r}")
    return f


def parse_budget(v: Any, name: str = "eps") -> float:
    """A budget or step size as a plain ``float``: a number, or a string ``"8/255"`` / ``"0.03"``.

    >>> parse_budget("8/255") == 8 / 255, parse_budget(0.5), parse_budget("1/2", "step_size")
    (True, 0.5, 0.5)
    """
    return float(_parse(v, name))


def default_step_size(eps: float, steps: int) -> float:
    """The default step size of every iterative attack: ``2.5 * eps / steps`` (Madry et al.).

    >>> round(default_step_size(8 / 255, 10) * 255, 6)
    2.0
    """
    return 2.5 * float(eps) / max(1, int(steps))


def resolve_step_size(step_size: Any, eps: float, steps: int) -> float:
    """``step_size`` parsed as a budget, or :func:`default_step_size` when it is ``None``.

    >>> resolve_step_size(None, 0.1, 5), resolve_step_size("1/255", 0.1, 5) == 1 / 255
    (0.05, True)
    """
    return default_step_size(eps, steps) if step_size is None else parse_budget(step_size, "step_size")


def make_generator(
    generator: torch.Generator | int | None | list, device: torch.device | str | None = None, name: str = "generator"
) -> Any:
    """The seeding convention: ``None`` (global RNG) stays ``None``, an ``int`` becomes a fresh generator on
    ``device`` seeded with it, a ``torch.Generator`` is checked to live on ``device``'s type. A list or tuple (one
    entry per image of the batch) becomes a list of generators: every image then draws its own random numbers
    (:func:`randn`, :func:`rand`), so its result does not depend on the batch it is in.

    >>> g = make_generator(0, "cpu")
    >>> torch.rand(1, generator=g).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [make_generator(g, dev, name) for g in generator]
    if isinstance(generator, bool):
        raise TypeError(f"`{name}` must be None, an int seed or a torch.Generator, got {generator!r}")
    if isinstance(generator, int):
        return torch.Generator(device=dev).manual_seed(int(generator))
    if isinstance(generator, torch.Generator):
        if torch.device(generator.device).type != dev.type:
            raise ValueError(f"`{name}` is on {generator.device} but the input is on {dev}")
        return generator
    raise TypeError(f"`{name}` must be None, an int seed or a torch.Generator, got {type(generator).__name__}")


def image_seed(*key: Any) -> int:
    """A 63-bit seed from a key (e.g. ``(seed, method, attack, eps, image_id)``): the per-image seeding rule of the
    evaluation engine and the monitors, independent of batch size, shard and process count.

    >>> image_seed(0, "saliency", "random_sign", "8/255", 17) == image_seed(0, "saliency", "random_sign", "8/255", 17)
    True
    """
    import hashlib

    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _draw(fn: Any, shape: Any, generator: Any, device: Any, dtype: Any) -> torch.Tensor:
    if isinstance(generator, list):
        shape = tuple(shape)
        if len(generator) != shape[0]:
            raise ValueError(f"`generator` holds {len(generator)} per-image generators for a batch of {shape[0]}")
        return torch.stack([fn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return fn(shape, generator=generator, device=device, dtype=dtype)


def randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """``torch.randn`` with the seeding convention; a list of generators draws row by row (one per image).

    >>> gens = make_generator([1, 2], "cpu")
    >>> bool(torch.equal(randn((2, 3), gens)[1], torch.randn(3, generator=torch.Generator().manual_seed(2))))
    True
    """
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """``torch.rand`` with the seeding convention (see :func:`randn`)."""
    return _draw(torch.rand, shape, generator, device, dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore *every* submodule's own train/eval flag afterwards.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> _ = net[1].eval()  # deliberately frozen submodule
    >>> with eval_mode(net):
    ...     net.training, net[0].training
    (False, False)
    >>> net.training, net[1].training
    (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def default_chunk(x: torch.Tensor, floats: int = 2**19, minimum: int = 16) -> int:
    """Images per model call when a batch of perturbed copies of ``x``'s images is scored in chunks and the caller
    gave no ``chunk_size``: ``floats`` input values per call (about 170 CIFAR-size images, 16 at 224x224), at least
    ``minimum``. Chunks of this size keep a small CNN's activations in cache on a CPU; larger ones were up to 2x
    slower in ``benchmarks/bench_metrics.py`` (a GPU user passes a larger ``chunk_size``).

    >>> default_chunk(torch.zeros(1, 3, 32, 32)), default_chunk(torch.zeros(1, 3, 224, 224))
    (170, 16)
    """
    return max(int(minimum), int(floats) // max(1, int(x[0].numel())))
