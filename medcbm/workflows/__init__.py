# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The jobs that the bundle configs run: inference, re-fitting, adaptation and audit.

Each job loads the bundle with :class:`medcbm.bundle.LoadedBundle` and runs its images through
:class:`medcbm.engine.PredictionEngine`; user errors end in one stderr line and exit status 2.
"""

from __future__ import annotations

from .adapt import AdaptationRunner
from .infer import InferenceRunner, format_top_concepts, prediction_columns, top_concepts
from ..bundle import save_bundle_network
from .train import TrainingRunner, run_training

__all__ = [
    "AdaptationRunner",
    "InferenceRunner",
    "TrainingRunner",
    "run_training",
    "check_cli_options",
    "save_bundle_network",
    "format_top_concepts",
    "top_concepts",
    "prediction_columns",
]


def check_cli_options() -> None:
    """Refuse unknown ``--options`` on the bundle command line (see :mod:`medcbm.workflows.cli`)."""
    try:
        from .cli import check_cli_options as _check
    except ImportError:  # the option check is not available in this build
        return
    _check()
