"""Experiments: one run from a configuration (:mod:`.run`), sweeps over grids with a
resumable SQLite results store, and shipped presets for the paper's settings."""

from .run import RunConfig, run_experiment

__all__ = ["RunConfig", "run_experiment"]
