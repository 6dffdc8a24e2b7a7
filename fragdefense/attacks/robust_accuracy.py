"""Robust accuracy under label attacks: the project's PGD (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks") and AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), through the maintained ``torchattacks`` library (optional dependency:
``pip install fragdefense[autoattack]``; imported only when one of its attacks runs).

A defense that stabilises explanations may also change how easily labels flip; :func:`robust_accuracy` measures it.
Every number it reports is measured: the returned ``x_adv`` are checked to lie in the eps-ball and in ``[0, 1]``,
and ``robust_correct`` is recomputed as ``model(x_adv).argmax(1) == y`` (never taken from the attack's own
bookkeeping). Images already misclassified count as not robust and are not attacked.

``"autoattack"`` is the *standard* version of the paper, assembled from torchattacks' components with the
paper's settings: APGD-CE (100 iterations), APGD-T (100 iterations, 9 target classes), FAB-T (100 iterations,
9 target classes) and Square (5000 queries, ``p_init=0.8``), run one after the other on the images still
correctly classified. (``torchattacks.AutoAttack(version="standard")`` itself runs 10 iterations per attack
and a rescaled Square schedule; ``steps=10`` gets close to it.)

Label attacks live in a registry, ``fn(model, x, y, eps, norm, steps, generator) -> x_adv``, read by
:func:`robust_accuracy`, the evaluation and the monitors:

>>> from fragdefense.attacks.robust_accuracy import list_label_attacks
>>> {"pgd", "autoattack", "apgd-ce", "apgd-t", "fab-t", "square"} <= set(list_label_attacks())
True
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.pgd import pgd_attack
from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range
from fragdefense.utils.conventions import eval_mode, make_generator, parse_budget

__all__ = [
    "LABEL_ATTACKS",
    "LabelAttack",
    "RobustAccuracyResult",
    "list_label_attacks",
    "register_label_attack",
    "robust_accuracy",
]

#: ``fn(model, x, y, eps, norm, steps, generator) -> x_adv``: ``x`` (B, C, H, W) in [0, 1], ``y`` (B,) labels,
#: ``eps`` a float in pixel units, ``norm`` ``"linf"`` / ``"l2"``, ``steps`` an int or ``None`` (the attack's
#: default), ``generator`` an int seed, a ``torch.Generator`` or ``None`` (global RNG).
LabelAttack = Callable[[nn.Module, Tensor, Tensor, float, str, "int | None", Any], Tensor]

LABEL_ATTACKS: dict[str, LabelAttack] = {}
#: optional ``check(model, x, y, n_classes, norm)`` run while validating the arguments (before any attack)
_CHECKS: dict[str, Callable[..., None]] = {}

NORMS = ("linf", "l2")
_TOL = 1e-6  # pixel units: float32 rounding of x +- eps


def register_label_attack(
    name: str, fn: LabelAttack, *, check: Callable[..., None] | None = None, overwrite: bool = False
) -> LabelAttack:
    """Register a label attack ``fn(model, x, y, eps, norm, steps, generator) -> x_adv`` under ``name``.

    ``check(model, x, y, n_classes, norm)``, when given, runs during argument validation (e.g. to say that an
    optional dependency is missing before anything is computed).

    >>> import torch
    >>> def fgsm(model, x, y, eps, norm, steps, generator):
    ...     x = x.clone().requires_grad_(True)
    ...     g, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), x)
    ...     return (x + eps * g.sign()).clamp(0, 1).detach()
    >>> _ = register_label_attack("fgsm-example", fgsm)
    >>> "fgsm-example" in list_label_attacks()
    True
    >>> del LABEL_ATTACKS["fgsm-example"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"`fn` of label attack {name!r} must be callable, got {type(fn).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"`check` of label attack {name!r} must be callable or None, got {type(check).__name__}")
    if name in LABEL_ATTACKS and not overwrite:
        raise ValueError(f"label attack {name!r} is already registered (pass overwrite=True to replace it)")
    LABEL_ATTACKS[name] = fn
    _CHECKS.pop(name, None)
    if check is not None:
        _CHECKS[name] = check
    return fn


def list_label_attacks() -> list[str]:
    """Names of the registered label attacks, sorted.

    >>> "pgd" in list_label_attacks()
    True
    """
    return sorted(LABEL_ATTACKS)


# --------------------------------------------------------------------------------------------------- the result


@dataclass
class RobustAccuracyResult:
    """Per-image outcome of :func:`robust_accuracy` (all tensors on the device of ``x``).

    Attributes:
        clean_correct: ``(B,)`` bool, ``model(x).argmax(1) == y``.
        robust_correct: ``(B,)`` bool, ``model(x_adv).argmax(1) == y`` recomputed here (``False`` where the clean
            image is already misclassified).
        x_adv: ``(B, C, H, W)`` the points evaluated (``x`` itself where nothing was attacked or the attack failed).
        eps: the budget (pixel units); attack: its name; norm: ``"linf"`` or ``"l2"``; steps: as passed
            (``None``: the attack's default).
        attacked: ``(B,)`` bool, images the attack ran on (the correctly classified ones).
        failed: ``(B,)`` bool, images where the attack raised or returned an invalid point (``on_error="mark"``):
            their robustness was *not measured*, and :meth:`summary` reports no robust accuracy.
        zero_gradient: ``(B,)`` bool, attacked images whose input gradient of the cross-entropy is exactly zero
            at ``x`` (a locally constant model or masked gradients: gradient attacks had nothing to follow).
        errors: messages of the failures.
    """

    clean_correct: Tensor
    robust_correct: Tensor
    x_adv: Tensor
    eps: float
    attack: str
    norm: str = "linf"
    steps: int | None = None
    attacked: Tensor | None = None
    failed: Tensor | None = None
    zero_gradient: Tensor | None = None
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """``clean_accuracy``, ``robust_accuracy`` (``None`` when the attack failed on some image), ``n``, counts
        of attacked / failed / zero-gradient images, ``attack``, ``eps``, ``norm``, ``steps``."""
        n = int(self.clean_correct.numel())
        n_failed = int(self.failed.sum()) if self.failed is not None else 0
        return {
            "clean_accuracy": float(self.clean_correct.float().mean()),
            "robust_accuracy": None if n_failed else float(self.robust_correct.float().mean()),
            "n": n,
            "n_attacked": int(self.attacked.sum()) if self.attacked is not None else n,
            "n_failed": n_failed,
            "n_zero_gradient": int(self.zero_gradient.sum()) if self.zero_gradient is not None else 0,
            "attack": self.attack,
            "eps": float(self.eps),
            "norm": self.norm,
            "steps": self.steps,
        }


# ------------------------------------------------------------------------------------------ the entry point


def _check_labels(y: Any, b: int, device: torch.device) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"`y` must be a torch.Tensor of integer class labels of shape ({b},), got {type(y).__name__}")
    if y.shape != (b,):
        raise ValueError(f"`y` must have shape ({b},) (one label per image of `x`), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"`y` must hold integer class labels, got dtype {y.dtype}")
    return y.to(device=device, dtype=torch.long)


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str = "autoattack",
    eps: float | str = "8/255",
    norm: str = "linf",
    steps: int | None = None,
    seed: int | torch.Generator | None = 0,
    batch_size: int | None = None,
    n_classes: int | None = None,
    on_error: str = "raise",
) -> RobustAccuracyResult:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under a registered label attack.

    The model runs in eval mode (:func:`~fragdefense.utils.conventions.eval_mode`; every submodule's flag is
    restored). For the torchattacks-based attacks the global torch RNG state (CPU, and the CUDA device in use),
    every parameter's ``requires_grad`` and ``.grad`` are saved and restored: torchattacks reseeds the global RNG
    and FAB back-propagates into the parameters. Each returned point is checked to lie in the eps-ball and in
    ``[0, 1]`` (tolerance ``1e-6``), and ``robust_correct`` is recomputed from the model's prediction there.

    Args:
        model: classifier taking images in ``[0, 1]`` (normalising inside) and returning logits ``(B, K)``.
        x: images ``(B, C, H, W)`` in ``[0, 1]``; y: integer labels ``(B,)`` in ``[0, n_classes)``.
        attack: a name of :func:`list_label_attacks`: ``"autoattack"`` (standard version), ``"pgd"`` (the
            project's :func:`~fragdefense.attacks.pgd_attack`, random start, default step ``2.5 * eps / steps``),
            ``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"``, ``"square"``.
        eps: budget in pixel units, a number or a string such as ``"8/255"``.
        norm: ``"linf"`` or ``"l2"``.
        steps: iterations; ``None``: the attack's default (PGD 20; APGD / FAB 100; Square 5000 queries). For
            ``"autoattack"`` it sets the APGD / FAB iterations and Square gets ``50 * steps`` queries (the
            paper's ratio); for ``"square"`` it is the number of queries.
        seed: an int, a ``torch.Generator`` or ``None`` (draw from the global RNG). torchattacks attacks are seeded
            with an int (drawn from the generator when one is given).
        batch_size: attack the (correctly classified) images in chunks of this size; ``None``: all at once.
            torchattacks draws its random starts for the whole chunk, so results can depend on the chunking.
        n_classes: number of classes ``K``; ``None``: the model's output width. AutoAttack, APGD-T and FAB-T
            need ``K >= 4`` (the targeted DLR loss uses the four largest logits).
        on_error: ``"raise"`` (default): an attack that raises or returns a point outside the ball / ``[0, 1]``
            is an error; ``"mark"``: those images get ``failed=True``, ``x_adv = x``, and the summary's
            ``robust_accuracy`` is ``None``.

    Returns:
        a :class:`RobustAccuracyResult`; ``.summary()`` gives the accuracies.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    >>> x = torch.rand(6, 3, 4, 4); y = net(x).argmax(1)
    >>> r = robust_accuracy(net, x, y, attack="pgd", eps="2/255", steps=5)
    >>> s = r.summary(); s["clean_accuracy"], s["n"]
    (1.0, 6)
    >>> bool(((r.x_adv - x).abs() <= 2 / 255 + 1e-6).all()), s["robust_accuracy"] <= s["clean_accuracy"]
    (True, True)
    """
    # ---- validation, before any work
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module returning logits (B, K), got {type(model).__name__}")
    x = check_images(x, "x")
    x = as_model_dtype(x, model)
    b = x.shape[0]
    y = _check_labels(y, b, x.device)
    if not isinstance(attack, str) or attack not in LABEL_ATTACKS:
        raise ValueError(f"`attack` must be one of the registered label attacks {list_label_attacks()}, got {attack!r}")
    eps = parse_budget(eps, "eps")
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"`norm` must be one of {list(NORMS)}, got {norm!r}")
    norm = norm.lower()
    if steps is not None:
        steps = check_int_in_range(steps, "steps", 1)
    if batch_size is not None:
        batch_size = check_int_in_range(batch_size, "batch_size", 1)
    if n_classes is not None:
        n_classes = check_int_in_range(n_classes, "n_classes", 2)
        _check_label_range(y, n_classes)
    if on_error not in ("raise", "mark"):
        raise ValueError(f"`on_error` must be 'raise' or 'mark', got {on_error!r}")
    if (
        seed is not None
        and not isinstance(seed, torch.Generator)
        and (isinstance(seed, bool) or not isinstance(seed, int))
    ):
        raise TypeError(f"`seed` must be an int, a torch.Generator or None, got {seed!r}")
    generator = make_generator(seed, x.device, "seed") if isinstance(seed, torch.Generator) else seed

    fn = LABEL_ATTACKS[attack]
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        if logits.ndim != 2 or logits.shape[0] != b:
            raise ValueError(f"`model` must return logits of shape ({b}, K), got {tuple(logits.shape)}")
        k = logits.shape[1]
        if n_classes is None:
            n_classes = k
            _check_label_range(y, n_classes)
        elif n_classes != k:
            raise ValueError(f"`n_classes`={n_classes} but the model returns {k} logits per image")
        if attack in _CHECKS:
            _CHECKS[attack](model, x, y, n_classes, norm)

        clean_correct = logits.argmax(1) == y
        idx = clean_correct.nonzero().flatten()
        x_adv = x.detach().clone()
        failed = torch.zeros(b, dtype=torch.bool, device=x.device)
        errors: list[str] = []
        chunk = int(idx.numel()) if batch_size is None else batch_size
        for start in range(0, int(idx.numel()), max(chunk, 1)):
            sel = idx[start : start + chunk]
            xs, ys = x[sel], y[sel]
            try:
                xa = fn(model, xs, ys, eps, norm, steps, generator)
                bad, why = _invalid(xa, xs, eps, norm)
            except Exception as e:  # noqa: BLE001 - reported per image with on_error="mark"
                if on_error == "raise":
                    raise
                bad, why, xa = (
                    torch.ones(sel.numel(), dtype=torch.bool, device=x.device),
                    f"{type(e).__name__}: {e}",
                    xs,
                )
            if bool(bad.any()):
                msg = f"attack {attack!r} on images {sel[bad].tolist()}: {why}"
                if on_error == "raise":
                    raise RuntimeError(msg + " (pass on_error='mark' to report these images as not measured)")
                errors.append(msg)
                failed[sel[bad]] = True
                xa = torch.where(bad.view(-1, 1, 1, 1), xs, xa.reshape(xs.shape).to(xs))
            x_adv[sel] = xa.detach().to(x_adv)

        # ---- measured, not taken from the attack's bookkeeping
        with torch.no_grad():
            robust_correct = (model(x_adv).argmax(1) == y) & clean_correct
        zero_gradient = torch.zeros(b, dtype=torch.bool, device=x.device)
        if idx.numel():
            xg = x[idx].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = model(xg)
                if out.requires_grad:
                    (g,) = torch.autograd.grad(F.cross_entropy(out, y[idx], reduction="sum"), xg, allow_unused=True)
                else:
                    g = None
            zero_gradient[idx] = True if g is None else g.flatten(1).abs().amax(1) == 0
    if errors:
        warnings.warn(
            f"{len(errors)} chunk(s) of the {attack!r} attack failed; {int(failed.sum())} image(s) not measured: "
            + "; ".join(errors),
            stacklevel=2,
        )
    n_masked = int((zero_gradient & robust_correct).sum())
    if n_masked:
        warnings.warn(
            f"{n_masked} image(s) counted robust under {attack!r} have an exactly zero input gradient at x: a locally "
            "constant model, or masked gradients (Athalye, Carlini & Wagner, 'Obfuscated Gradients Give a False "
            "Sense of Security') - gradient attacks had nothing to follow; see `zero_gradient`",
            stacklevel=2,
        )
    return RobustAccuracyResult(
        clean_correct=clean_correct,
        robust_correct=robust_correct & ~failed,
        x_adv=x_adv,
        eps=eps,
        attack=attack,
        norm=norm,
        steps=steps,
        attacked=clean_correct.clone(),
        failed=failed,
        zero_gradient=zero_gradient,
        errors=errors,
    )


def _check_label_range(y: Tensor, n_classes: int) -> None:
    if bool(((y < 0) | (y >= n_classes)).any()):
        raise ValueError(
            f"`y` must hold class labels in [0, {n_classes - 1}] (n_classes = {n_classes}), got {y.tolist()}"
        )


def _invalid(xa: Any, x: Tensor, eps: float, norm: str) -> tuple[Tensor, str]:
    """Per image: is ``xa`` not a finite point of the eps-ball around ``x`` inside ``[0, 1]``? And why."""
    if not isinstance(xa, Tensor) or xa.shape != x.shape:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device), (
            f"returned {getattr(xa, 'shape', type(xa).__name__)} instead of a tensor of shape {tuple(x.shape)}"
        )
    xa = xa.detach().to(x)
    finite = torch.isfinite(xa).flatten(1).all(1)
    d = (xa - x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    out_ball = dist > eps + _TOL
    out_box = (xa < -_TOL).flatten(1).any(1) | (xa > 1 + _TOL).flatten(1).any(1)
    bad = ~finite | out_ball | out_box
    why = []
    if bool((~finite).any()):
        why.append("non-finite values")
    if bool(out_ball.any()):
        why.append(f"{norm} distance {float(dist[out_ball].max()):.3g} > eps {eps:.3g}")
    if bool(out_box.any()):
        why.append("pixels outside [0, 1]")
    return bad, ", ".join(why)


# ----------------------------------------------------------------------------------------- the attacks


def _pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any) -> Tensor:
    return pgd_attack(model, x, y, eps=eps, steps=20 if steps is None else steps, threat=norm, generator=generator)


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as e:  # pragma: no cover - torchattacks is installed in the dev environment
        raise ImportError(
            "AutoAttack, APGD, FAB and Square come from the torchattacks library: pip install fragdefense[autoattack]"
        ) from e
    return torchattacks


def _seed_int(generator: Any, device: torch.device) -> int:
    """torchattacks seeds the global RNG with an int: the int itself, else one drawn from the generator / the
    global RNG (which then advances, as any use of it does)."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator
    if isinstance(generator, (list, tuple)):
        raise TypeError("torchattacks attacks take one int seed or torch.Generator, not per-image generators")
    g = make_generator(generator, device)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=device).item())


@contextlib.contextmanager
def _isolated(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore what torchattacks changes: the global RNG (it calls ``torch.manual_seed``), parameters' ``.grad``
    (FAB calls ``backward``), ``requires_grad`` flags and every submodule's train/eval flag; its prints are
    swallowed. Parameters do not require grad meanwhile (no parameter gradient is computed or accumulated)."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda), contextlib.redirect_stdout(io.StringIO()):
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag, grad in saved:
                p.requires_grad_(flag)
                p.grad = grad
            for m, flag in modes:
                m.training = flag


def _n_target(k: int) -> int:
    return min(9, k - 1)  # the standard version: 9 target classes (all others when K <= 10)


def _ta_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[norm]


def _run_ta(build: Callable[[Any, int, int], Any], model: nn.Module, x: Tensor, y: Tensor, generator: Any) -> Tensor:
    ta = _torchattacks()
    seed = _seed_int(generator, x.device)
    with _isolated(model, x.device):
        with torch.no_grad():
            k = int(model(x[:1]).shape[1])
        atk = build(ta, seed, k)
        atk.set_device(x.device)
        return atk(x, y).detach()


def _apgd_ce(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any
) -> Tensor:
    n = 100 if steps is None else steps
    return _run_ta(
        lambda ta, s, k: ta.APGD(model, norm=_ta_norm(norm), eps=eps, steps=n, n_restarts=1, seed=s, loss="ce"),
        model,
        x,
        y,
        generator,
    )


def _apgdt(ta: Any, model: nn.Module, eps: float, norm: str, n: int, s: int, k: int) -> Any:
    a = ta.APGDT(model, norm=_ta_norm(norm), eps=eps, steps=n, n_restarts=1, seed=s, n_classes=k)
    a.n_target_classes = _n_target(k)
    return a


def _fabt(ta: Any, model: nn.Module, eps: float, norm: str, n: int, s: int, k: int) -> Any:
    a = ta.FAB(model, norm=_ta_norm(norm), eps=eps, steps=n, n_restarts=1, seed=s, multi_targeted=True, n_classes=k)
    a.n_target_classes = _n_target(k)
    return a


def _square(ta: Any, model: nn.Module, eps: float, norm: str, q: int, s: int) -> Any:
    return ta.Square(
        model, norm=_ta_norm(norm), eps=eps, n_queries=q, n_restarts=1, p_init=0.8, resc_schedule=False, seed=s
    )


def _apgd_t(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any) -> Tensor:
    n = 100 if steps is None else steps
    return _run_ta(lambda ta, s, k: _apgdt(ta, model, eps, norm, n, s, k), model, x, y, generator)


def _fab_t(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any) -> Tensor:
    n = 100 if steps is None else steps
    return _run_ta(lambda ta, s, k: _fabt(ta, model, eps, norm, n, s, k), model, x, y, generator)


def _square_attack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any
) -> Tensor:
    q = 5000 if steps is None else steps
    return _run_ta(lambda ta, s, k: _square(ta, model, eps, norm, q, s), model, x, y, generator)


def _autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None, generator: Any
) -> Tensor:
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square, each on the images the previous ones left."""
    n = 100 if steps is None else steps

    def build(ta: Any, s: int, k: int) -> Any:
        apgd = ta.APGD(model, norm=_ta_norm(norm), eps=eps, steps=n, n_restarts=1, seed=s, loss="ce")
        parts = [apgd, _apgdt(ta, model, eps, norm, n, s, k), _fabt(ta, model, eps, norm, n, s, k)]
        return ta.MultiAttack([*parts, _square(ta, model, eps, norm, 50 * n, s)])

    return _run_ta(build, model, x, y, generator)


def _needs_torchattacks(min_classes: int = 2) -> Callable[..., None]:
    def check(model: Any, x: Tensor, y: Tensor, n_classes: int, norm: str) -> None:
        _torchattacks()
        if n_classes < min_classes:
            raise ValueError(
                f"`n_classes` must be >= {min_classes} for this attack (the targeted DLR loss of Croce & Hein "
                f"compares the four largest logits), got {n_classes}; use attack='pgd' or 'apgd-ce'"
            )

    return check


register_label_attack("pgd", _pgd)
register_label_attack("autoattack", _autoattack, check=_needs_torchattacks(4))
register_label_attack("apgd-ce", _apgd_ce, check=_needs_torchattacks(2))
register_label_attack("apgd-t", _apgd_t, check=_needs_torchattacks(4))
register_label_attack("fab-t", _fab_t, check=_needs_torchattacks(2))
register_label_attack("square", _square_attack, check=_needs_torchattacks(2))
