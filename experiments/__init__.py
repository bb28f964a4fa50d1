"""Experiment configs, the generation-loop runner, MLflow tracking and the ``forkpop`` command."""
