# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""What the bundle jobs that read images share (inference, adaptation, audit): where the bundle and the output
folder are, how the bundle is loaded, which images a job reads when none are given (the bundle's examples), and
how a finished job with unreadable inputs ends on the command line.

The runners keep their own explicit keyword arguments (the bundle configs instantiate them by name); this base
only stores the common ones once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..bundle import LoadedBundle
from ..data import InputRecord, list_inputs, make_sample_inputs
from .cli import cli_errors

__all__ = ["BundleJob", "EXAMPLES_CSV", "examples_csv", "default_records", "input_records"]

EXAMPLES_CSV = Path("examples") / "examples.csv"


def examples_csv(bundle_root: str | Path) -> Path:
    """Where a bundle lists its shipped example images (with their known class)."""
    return Path(bundle_root) / EXAMPLES_CSV


def default_records(bundle_root: str | Path, modality: str, output_dir: Path) -> list[InputRecord]:
    """The bundle's shipped real example images (with their known class); generated samples if none ship."""
    csv_path = examples_csv(bundle_root)
    if csv_path.is_file():
        return list_inputs(csv_path)
    paths = make_sample_inputs(modality, output_dir / "samples")
    return [InputRecord(image=str(p), path=Path(p)) for p in paths]


def input_records(
    input: str | Path | None, bundle_root: str | Path, modality: str, output_dir: Path
) -> tuple[list[InputRecord], str | None]:
    """``(records, source)``: the records of ``input`` (folder, CSV or image) and its name, or, when ``input`` is
    ``None``, :func:`default_records` and ``None`` (the inference and audit jobs both read images this way)."""
    if input is None:
        return default_records(bundle_root, modality, output_dir), None
    return list_inputs(input), str(input)


class BundleJob:
    """Common state of a bundle job; subclasses implement ``_run``."""

    def _init_job(
        self,
        bundle_root: str | Path,
        output_dir: str | Path,
        device: str | torch.device,
        batch_size: int,
        num_workers: int,
        progress: bool,
        exit_on_error: bool,
        bundle: LoadedBundle | None,
        **load_args: Any,
    ) -> None:
        """Store the arguments every job has; ``load_args`` go to :meth:`LoadedBundle.load` (``models_dir``,
        ``backbone``, ``pretrained``, ``adaptation``, ``channel_mode``)."""
        self.bundle_root = Path(bundle_root)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.progress = progress
        self.exit_on_error = exit_on_error
        self.bundle = bundle
        self.load_args = load_args

    def load_bundle(self) -> LoadedBundle:
        """The bundle given to the constructor, else the one at ``bundle_root`` loaded with ``load_args``."""
        return self.bundle or LoadedBundle.load(self.bundle_root, device=self.device, **self.load_args)

    def _run_counting_errors(self, what: str, total: Any, where: Path) -> int:
        """Run ``_run`` (which returns how many inputs failed) under the CLI's error handling; on the command line
        a job with failed inputs ends with status 1 after writing everything, naming where to look."""
        with cli_errors(exit=self.exit_on_error):
            n_err = self._run()
        if n_err and self.exit_on_error:
            print(f"medcbm: {n_err} of {total()} inputs {what}; see {where}", file=sys.stderr)
            sys.exit(1)
        return n_err

    def _run(self) -> Any:  # pragma: no cover - each job defines it
        raise NotImplementedError
