"""Shared test fixtures. W&B runs in its real offline mode (no API key in CI)."""

from __future__ import annotations

import os

# Must precede the first torch import: OpenMP's default spin-waiting makes multi-op torch code 5-30x slower
# when the cores are shared with other jobs (as on small CI machines).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")  # never try the network from tests
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cifar10_jpeg_root() -> str:
    """Path of the CIFAR-10 JPEG copy (docs/background.md §7), from $FRAGDEFENSE_CIFAR10_JPEG."""
    root = os.environ.get("FRAGDEFENSE_CIFAR10_JPEG")
    if not root:
        pytest.skip("real-data test: set FRAGDEFENSE_CIFAR10_JPEG to the extracted cifar10-jpeg folder (.ci/run does)")
    if not os.path.isdir(os.path.join(root, "train")):
        pytest.skip(f"real-data test: FRAGDEFENSE_CIFAR10_JPEG={root!r} has no train/ folder")
    return root


_DETERMINISTIC_AT_START = (
    torch.are_deterministic_algorithms_enabled(),
    torch.is_deterministic_algorithms_warn_only_enabled(),
)


@pytest.fixture(autouse=True)
def _restore_deterministic_flag():
    """Lightning's ``Trainer(deterministic=True)`` switches ``torch.use_deterministic_algorithms`` on for the whole
    process and never switches it back (also from module-scoped fixtures); every test starts from the process's
    initial setting so one test's trainer does not change another test's kernels."""
    torch.use_deterministic_algorithms(_DETERMINISTIC_AT_START[0], warn_only=_DETERMINISTIC_AT_START[1])
    yield


# a plugin module registers extensions when imported: only tests/test_extending.py imports it (and cleans up)
collect_ignore = ["ext_plugin.py"]
