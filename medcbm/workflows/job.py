# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""What the bundle jobs that read images share (inference, adaptation, audit): where the bundle and the output
folder are, how the bundle is loaded, which images a job reads when none are given (the bundle's examples), and
how a finished job with unreadable inputs ends on the command line.

The options every job has (where the bundle is, how it is loaded, device and batching, progress, CLI behaviour)
are declared and documented once, in :class:`BundleJob`; each runner declares only its own and passes the rest
on (the bundle configs instantiate the runners by keyword).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..bundle import LoadedBundle
from ..data import InputRecord, list_inputs, make_sample_inputs
from ..options import is_unset, optional
from .cli import cli_errors

__all__ = ["BundleJob", "ImageJob", "EXAMPLES_CSV", "examples_csv", "default_records", "input_records"]

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
    """Common state of a bundle job; subclasses implement ``_run``.

    Args:
        bundle_root: the bundle folder.
        output_dir: where the job writes.
        models_dir, backbone, pretrained, adaptation, channel_mode: how the bundle is loaded (see
            :meth:`LoadedBundle.load`; ``None`` keeps the bundle's own).
        device: torch device.
        batch_size: images per forward pass; num_workers: DataLoader reader processes.
        progress: show a progress bar.
        exit_on_error: the CLI behaviour (exit 1 after writing everything if an input failed, exit 2 with one
            line for a bad command); ``False`` returns / raises instead (the Python API).
        bundle: an already loaded bundle (then the loading arguments are ignored).
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "out",
        *,
        models_dir: str | Path | None = None,
        backbone: str | None = None,
        pretrained: str | None = None,
        adaptation: str | Path | None = None,
        channel_mode: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = True,
        exit_on_error: bool = True,
        bundle: LoadedBundle | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.progress = progress
        self.exit_on_error = exit_on_error
        self.bundle = bundle
        loading = dict(models_dir=models_dir, backbone=backbone, pretrained=pretrained, adaptation=adaptation)
        self.load_args = {k: v for k, v in {**loading, "channel_mode": channel_mode}.items() if not is_unset(v)}

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


class ImageJob(BundleJob):
    """A job over the user's images (inference, audit): a folder, CSV or image, or the bundle's examples.

    Args:
        bundle_root, output_dir: as for :class:`BundleJob`.
        input: folder, CSV or image; ``None`` runs on the bundle's example images.
        modality: for generated samples when a bundle ships no examples.
        top_k: concepts listed per image.
        job: the options every job has (see :class:`BundleJob`).
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "out",
        input: str | Path | None = None,
        *,
        modality: str = "blood",
        top_k: int = 5,
        **job: Any,
    ) -> None:
        super().__init__(bundle_root, output_dir, **job)
        self.input = optional(input)
        self.modality = modality
        self.top_k = int(top_k)

    def input_records(self) -> tuple[list[InputRecord], str | None]:
        """The records to read and the input's name (``None``: the bundle's examples); see :func:`input_records`."""
        return input_records(self.input, self.bundle_root, self.modality, self.output_dir)
