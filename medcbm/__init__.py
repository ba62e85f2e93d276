# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""medcbm: knowledge-prior concept bottleneck models as MONAI bundles.

Where things live:

- the model: :mod:`medcbm.concepts` (concept banks + prior), :mod:`medcbm.backbones` (open_clip),
  :mod:`medcbm.grounding` (features -> concept scores), :mod:`medcbm.head` (prior-constrained head),
  :mod:`medcbm.networks` (the ``nn.Module``), :mod:`medcbm.features` (feature cache);
- images: :mod:`medcbm.transforms` (DICOM/NIfTI/PIL readers, encoder input), :mod:`medcbm.data` (inputs);
- the jobs the bundles run: :mod:`medcbm.workflows` (infer, train);
- staged research data and default-backbone training: :mod:`medcbm.datasets`, :mod:`medcbm.pretrain`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .concepts import Concept, ConceptBank, ConceptBankError, load_concept_bank
from .grounding import ProbeGrounding, TextGrounding, fit_concept_probes, grounding_report
from .head import KnowledgePriorHead
from .networks import ConceptBottleneckClassifier

__all__ = [
    "__version__",
    "Concept",
    "ConceptBank",
    "ConceptBankError",
    "load_concept_bank",
    "ProbeGrounding",
    "TextGrounding",
    "fit_concept_probes",
    "grounding_report",
    "KnowledgePriorHead",
    "ConceptBottleneckClassifier",
]
