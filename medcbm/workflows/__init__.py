# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The jobs that the bundle configs run: inference and re-fitting (adaptation and audit build on them)."""

from __future__ import annotations

from .infer import InferenceRunner, format_top_concepts, prediction_columns
from .loading import apply_adaptation, load_bundle_network, save_bundle_network
from .train import TrainingRunner

__all__ = [
    "InferenceRunner",
    "TrainingRunner",
    "load_bundle_network",
    "save_bundle_network",
    "apply_adaptation",
    "format_top_concepts",
    "prediction_columns",
]
