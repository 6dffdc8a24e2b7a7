"""The Hydra configs of the ``fragdefense-*`` commands, shipped as package data.

``train.yaml``, ``eval.yaml``, ``eval_compare.yaml``, ``influence.yaml`` and ``hessian.yaml`` are the primary
configs; the sub-folders are Hydra config groups (data, model, trainer, logger, callbacks, regularizer,
experiment). :func:`fragdefense.cli._config.config_dir` returns this folder's path and
:func:`fragdefense.cli._config.compose_config` composes from it.
"""
