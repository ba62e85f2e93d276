# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Vision(-language) backbones through open_clip.

A backbone is named the way open_clip names models:

- ``local-dir:PATH``: a folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``
  (how every bundle ships its default weights; needs no network);
- ``hf-hub:org/repo``: weights on the Hugging Face hub (needs network the first time), e.g.
  ``hf-hub:yyupenn/whylesionclip``;
- an open_clip model name plus ``pretrained`` (a tag such as ``openai`` or a local weights file);
- a preset name from :data:`BACKBONE_PRESETS` (``whylesionclip``, ``whyxrayclip``, ``biomedclip``).

Hub weights of the presets are checked against a pinned sha256 before they are loaded.

Weights are loaded safely: safetensors, or ``torch.load(weights_only=True)`` inside open_clip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from monai.utils import optional_import
from safetensors.torch import save_file

from .io.atomic import atomic_write_json
from .errors import BackboneUnavailableError
from .io.files import file_sha256

open_clip, _has_open_clip = optional_import("open_clip")

__all__ = [
    "BACKBONE_PRESETS",
    "BackboneUnavailableError",
    "HUB_CONNECT_TIMEOUT_S",
    "hub_reachable",
    "hub_files_cached",
    "hub_unavailable_message",
    "verify_hub_weights",
    "Backbone",
    "ImageEncoder",
    "load_backbone",
    "save_local_dir",
    "backbone_fingerprint",
    "file_sha256",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"

#: Named hub backbones (``--backbone whylesionclip`` works like the full spec). ``sha256`` is the Git LFS
#: object hash of the weights file published on the Hugging Face model page; a download that does not
#: match is refused before any weights are read.
BACKBONE_PRESETS: dict[str, dict[str, str]] = {
    "whylesionclip": {
        "spec": "hf-hub:yyupenn/whylesionclip",
        "weights": "open_clip_pytorch_model.bin",
        "sha256": "2566a9c22f9ee9a3991a5b469942baadb8da4c46abd06220745f68fba073ec7a",
    },
    "whyxrayclip": {
        "spec": "hf-hub:yyupenn/whyxrayclip",
        "weights": "open_clip_pytorch_model.bin",
        "sha256": "4864860e7c25f4648b3d7ca8ce473901dd9864e8a4536bdb23b7c77f4930740f",
    },
    "biomedclip": {
        "spec": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "weights": "open_clip_pytorch_model.bin",
        "sha256": "52cc993c5c5ff962bd0c60931874bc001e7e9b41666a385530f4a036294576be",
    },
}


#: Which bundle's ``large_files.yml`` fetches each preset (``download_large_files`` puts it in models/hub/<name>).
_PRESET_BUNDLES = {"whylesionclip": "derm_cbm", "whyxrayclip": "cxr_cbm", "biomedclip": "blood_cbm"}
_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

#: Seconds one connection attempt to the hub (or the HTTPS proxy) may take before a backbone that is not
#: cached is declared unavailable; ``MEDCBM_HUB_TIMEOUT`` overrides it.
HUB_CONNECT_TIMEOUT_S = 3.0


def hub_reachable(timeout: float | None = None) -> tuple[bool, str]:
    """One TCP connection attempt to the Hugging Face endpoint (or the HTTPS proxy), no retries.

    huggingface_hub itself retries an unreachable host five times with back-off (about half a minute per
    file); this answers within ``timeout`` seconds, DNS included.

    Returns:
        ``(True, "")`` or ``(False, reason)``; ``HF_HUB_OFFLINE=1`` answers ``False`` without any attempt.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False, "HF_HUB_OFFLINE is set"
    if timeout is None:
        timeout = float(os.environ.get("MEDCBM_HUB_TIMEOUT", HUB_CONNECT_TIMEOUT_S))
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), ""
    )
    url = urlparse(proxy if "://" in proxy else (f"http://{proxy}" if proxy else constants.ENDPOINT))
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=attempt, name="medcbm-hub-probe", daemon=True)  # DNS has no timeout of its own
    t.start()
    t.join(timeout)
    if not result:
        return False, f"no connection to {host}:{port} within {timeout:g} s"
    return (not result[0]), result[0]


def hub_files_cached(repo_id: str, filenames: Sequence[str]) -> dict[str, Path]:
    """The files of ``repo_id`` already in the local Hugging Face cache (name -> path); no network."""
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and Path(path).is_file():
            found[name] = Path(path)
    return found


def hub_unavailable_message(name: str, spec: str, reason: str) -> str:
    """One line: which backbone, why it cannot be had, how to fetch its weights and use them via ``local-dir:``."""
    repo = spec[len(HF_HUB) :]
    shown = name if name == spec else f"{name} ({spec})"
    preset = next((k for k, p in BACKBONE_PRESETS.items() if p["spec"] == spec), None)
    bundle = _PRESET_BUNDLES.get(preset or "")
    if bundle and preset:
        folder = f"bundles/{bundle}/models/hub/{preset}"
        fetch = (
            f"`python -m monai.bundle download_large_files --bundle_path bundles/{bundle}` on a connected machine, "
            f"copy {folder} here and pass --backbone local-dir:{folder}"
        )
    else:
        fetch = (
            f"`hf download {repo} --local-dir DIR` (huggingface_hub's CLI) on a connected machine, "
            "copy DIR here and pass --backbone local-dir:DIR"
        )
    return (
        f"backbone {shown} is not in the local Hugging Face cache and the hub cannot be reached ({reason}); run {fetch}"
    )


def verify_hub_weights(spec: str) -> Path | None:
    """Find (in the HF cache) or download a preset hub backbone's weights and check their sha256.

    Returns the verified file, or ``None`` for a spec without a pinned hash.

    Raises:
        BackboneUnavailableError: the file is not cached and cannot be downloaded.
        ValueError: the file's sha256 differs from the pinned one (the file is named in the message).
    """
    preset = next((p for p in BACKBONE_PRESETS.values() if p["spec"] == spec), None)
    if preset is None:
        return None
    repo = spec[len(HF_HUB) :]
    path = hub_files_cached(repo, [preset["weights"]]).get(preset["weights"])
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, preset["weights"]))
        except Exception as e:  # offline, proxy, gated repo: say what to do instead of a hub traceback
            name = next(k for k, p in BACKBONE_PRESETS.items() if p is preset)
            raise BackboneUnavailableError(
                f"cannot fetch {preset['weights']} of {spec} ({type(e).__name__}); "
                + hub_unavailable_message(name, spec, str(e).splitlines()[0] if str(e) else type(e).__name__)
            ) from e
    digest = file_sha256(path)
    if digest != preset["sha256"]:
        raise ValueError(
            f"{path}: sha256 {digest} does not match the pinned {preset['sha256']} for {spec}; "
            "refusing to load these weights (delete the file and download again)"
        )
    return path


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Within: huggingface_hub answers from its cache only (no HEAD requests, no retries)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def backbone_fingerprint(spec: str, pretrained: str | None = None) -> str:
    """Identity of a backbone's weights: content hashes for local files, the name for hub models.

    Anything cached or fitted on one backbone (features, text embeddings, probes, heads) is stale
    for a backbone with another fingerprint.
    """
    parts: list[str] = [spec, pretrained or ""]
    if spec.startswith(LOCAL_DIR):
        folder = Path(spec[len(LOCAL_DIR) :])
        for name in ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (folder / name).is_file():
                digest = _config_sha256(folder / name) if name.endswith(".json") else file_sha256(folder / name)
                parts.append(f"{name}={digest}")
        parts[0] = LOCAL_DIR  # the same weights in another folder are the same backbone
    elif pretrained and Path(pretrained).is_file():
        parts[1] = f"file={file_sha256(pretrained)}"
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _config_sha256(path: Path) -> str:
    """sha256 of a JSON config's canonical form: re-indenting the file (the model zoo's pretty-JSON hook)
    does not make it another backbone; any change of a value does."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return file_sha256(path)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ImageEncoder(torch.nn.Module):
    """The image tower of a CLIP model; returns L2-normalised embeddings ``(B, D)``."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image), dim=-1)


@dataclass
class Backbone:
    """A loaded open_clip model and what medcbm needs to know about it."""

    spec: str
    model: torch.nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    pretrained: str | None = None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def embed_dim(self) -> int:
        with torch.no_grad():
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            return int(self.encode_images(dummy).shape[-1])

    def image_encoder(self) -> ImageEncoder:
        """The image tower alone (what the concept bottleneck network keeps for inference)."""
        return ImageEncoder(self.model.visual)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return F.normalize(self.model.encode_image(images), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(len(texts), D)``; needs the text tower and tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.spec)
        self.model.eval()
        tokens = self._tokenizer(list(texts))
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def preprocessing(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def load_backbone(spec: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Load an open_clip backbone by spec (``local-dir:``, ``hf-hub:``, or model name + ``pretrained``).

    A hub spec is loaded from the local Hugging Face cache when its config and weights are there (no
    network); otherwise one short connection attempt decides, before any download, whether it can be
    fetched.

    Raises:
        BackboneUnavailableError: a hub backbone is not cached and the hub cannot be reached (one line
            naming the backbone, ``local-dir:`` and how to fetch the weights).
        FileNotFoundError: a ``local-dir:`` folder or its files are missing.
        ValueError: the spec is empty.
    """
    if not spec:
        raise ValueError("backbone spec is empty; use 'local-dir:PATH', 'hf-hub:org/repo' or an open_clip model name")
    name = spec
    spec = BACKBONE_PRESETS.get(spec, {}).get("spec", spec)
    cached = False
    if spec.startswith(HF_HUB):
        # Cache first, then one short connection attempt: offline ends here in seconds with one line,
        # not after huggingface_hub's retries for every candidate file.
        repo = spec[len(HF_HUB) :]
        found = hub_files_cached(repo, ("open_clip_config.json", *_HUB_WEIGHTS))
        cached = "open_clip_config.json" in found and any(w in found for w in _HUB_WEIGHTS)
        if not cached:
            ok, reason = hub_reachable()
            if not ok:
                raise BackboneUnavailableError(hub_unavailable_message(name, spec, reason))
        verify_hub_weights(spec)
    if spec.startswith(LOCAL_DIR):
        folder = Path(spec[len(LOCAL_DIR) :])
        cfg_path = folder / "open_clip_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"backbone folder {folder} has no open_clip_config.json (spec {spec!r})")
        if not any((folder / n).is_file() for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
            raise FileNotFoundError(
                f"backbone folder {folder} has no open_clip_model.safetensors; "
                "run `python -m monai.bundle download_large_files --bundle_path <bundle>` or rebuild it"
            )
        # open_clip resolves the folder relative to the CWD; pass it absolute so any CWD works.
        spec = LOCAL_DIR + str(folder.resolve())
    with _hub_offline(cached):
        model = open_clip.create_model(spec, pretrained=pretrained, device=device, weights_only=True)
    model.eval()
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        size = size[0]
    mean = tuple(float(v) for v in pp.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in pp.get("std", OPENAI_CLIP_STD))
    return Backbone(
        spec=spec,
        model=model,
        image_size=int(size),
        mean=mean,
        std=std,
        fingerprint=backbone_fingerprint(spec, pretrained),
        pretrained=pretrained,
    )


def save_local_dir(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    folder: str | Path,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    half: bool = False,
    extra: dict[str, Any] | None = None,
    resize_mode: str = "shortest",
) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder (config JSON + safetensors).

    Args:
        half: store weights as float16 (halves the size; open_clip casts back on load).
        extra: more keys for ``open_clip_config.json`` (e.g. provenance of the training run).
        resize_mode: ``preprocess_cfg.resize_mode`` (``"shortest"``: resize + centre crop; ``"longest"``:
            pad to square, keeping the whole field of view).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = model_cfg["vision_cfg"]["image_size"]
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": size,
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bicubic",
            "resize_mode": resize_mode,
        },
    }
    if extra:
        cfg.update(extra)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "open_clip_model.safetensors")
    atomic_write_json(folder / "open_clip_config.json", cfg)  # 4-space pretty JSON (MONAI model zoo)
    return folder
