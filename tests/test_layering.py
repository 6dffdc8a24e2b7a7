"""Import layering (README, Layout): the functional core never pulls in the ecosystem layers."""

from __future__ import annotations


def test_core_packages_import_no_ecosystem_layer():
    import subprocess
    import sys

    code = (
        "import sys; import fragdefense.regularizers, fragdefense.attacks, fragdefense.hessian, "
        "fragdefense.influence, fragdefense.attributions, fragdefense.evaluation, fragdefense.evaluation.explainers, "
        "fragdefense.evaluation.report, fragdefense.evaluation.figures, fragdefense.evaluation.quality, "
        "fragdefense.evaluation.certified, fragdefense.certify, fragdefense.metrics.robustness, "
        "fragdefense.metrics.faithfulness, fragdefense.attacks.robust_accuracy; "
        "bad = [m for m in ('lightning', 'torchmetrics', 'wandb', 'hydra', 'omegaconf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
