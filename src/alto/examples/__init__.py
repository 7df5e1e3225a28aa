"""Example pipelines shipped with alto (configs/demo.toml uses :mod:`alto.examples.demo`)."""
