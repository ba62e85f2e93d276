# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""An offline hub backbone fails at once with one line; a cached one loads with no network at all."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import build_tiny_backbone

import medcbm.backbones as backbones
from medcbm.errors import BackboneUnavailableError, MedcbmUserError
from medcbm.workflows.cli import cli_errors


@pytest.fixture
def no_hub(monkeypatch):
    """Any download or model build from the hub is recorded (and fails) instead of touching the network."""
    import huggingface_hub
    import open_clip

    calls: list[tuple] = []

    def download(*args, **kwargs):
        calls.append(("hf_hub_download", args, kwargs))
        raise OSError("network used")

    def create(*args, **kwargs):
        calls.append(("create_model", args, kwargs))
        raise OSError("model built")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(open_clip, "create_model", create)
    return calls


@pytest.mark.parametrize("spec", ["whyxrayclip", "hf-hub:someone/not-cached"])
def test_unreachable_hub_fails_with_one_line_before_any_download(spec, no_hub, monkeypatch):
    attempts: list[float | None] = []

    def unreachable(timeout=None):
        attempts.append(timeout)
        return False, "cannot connect to huggingface.co:443: Name or service not known"

    monkeypatch.setattr(backbones, "hub_reachable", unreachable)
    with pytest.raises(BackboneUnavailableError) as err:
        backbones.load_backbone(spec)
    msg = str(err.value)
    assert len(attempts) == 1 and no_hub == []  # one probe; no hub download, retry or model build
    assert "\n" not in msg and spec in msg and "local-dir:" in msg
    assert isinstance(err.value, MedcbmUserError)
    if spec == "whyxrayclip":  # a preset says which bundle's large files hold it
        assert "download_large_files --bundle_path bundles/cxr_cbm" in msg
        assert "local-dir:bundles/cxr_cbm/models/hub/whyxrayclip" in msg
    else:
        assert "hf download someone/not-cached" in msg


def test_hf_hub_offline_makes_no_connection_attempt(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected although offline"))
    assert backbones.hub_reachable() == (False, "HF_HUB_OFFLINE is set")


def test_hub_probe_is_one_attempt_and_does_not_wait_for_a_hanging_connection(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    release = threading.Event()
    attempts: list[tuple] = []

    def hang(address, timeout=None):
        attempts.append((address, timeout))
        release.wait()  # a DNS lookup or SYN that never answers
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        ok, reason = backbones.hub_reachable(timeout=0.05)
    finally:
        release.set()
    assert not ok and "within 0.05 s" in reason
    assert len(attempts) == 1 and attempts[0][1] == 0.05

    def refused(address, timeout=None):
        attempts.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    attempts.clear()
    monkeypatch.setattr(socket, "create_connection", refused)
    ok, reason = backbones.hub_reachable(timeout=1.0)
    assert not ok and "Connection refused" in reason and len(attempts) == 1


def test_hub_probe_goes_through_the_https_proxy(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    seen: list[tuple] = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: seen.append(address) or Conn())
    assert backbones.hub_reachable(timeout=1.0) == (True, "")
    assert seen == [("proxy.example", 3128)]


def test_cached_hub_backbone_loads_without_network(tmp_path, monkeypatch):
    """Config + weights in the HF cache: loaded offline; no probe, no HEAD request, no retry."""
    import huggingface_hub
    from huggingface_hub import constants

    build_tiny_backbone(tmp_path / "tiny", name="medcbm-test-hubcache")
    cache = tmp_path / "hf_cache"
    repo_dir = cache / "models--medcbm-test--tiny"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (snapshot / name).write_bytes((tmp_path / "tiny" / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "hub_reachable", lambda timeout=None: pytest.fail("probed although cached"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used although cached"))
    offline_during_build: list[bool] = []
    real_create = backbones.open_clip.create_model

    def create(*args, **kwargs):
        offline_during_build.append(huggingface_hub.constants.is_offline_mode())
        return real_create(*args, **kwargs)

    monkeypatch.setattr(backbones.open_clip, "create_model", create)
    bk = backbones.load_backbone("hf-hub:medcbm-test/tiny")
    assert bk.spec == "hf-hub:medcbm-test/tiny" and bk.image_size > 0
    assert offline_during_build == [True]  # open_clip's own hub calls answered from the cache
    assert constants.HF_HUB_OFFLINE is False  # restored afterwards


def test_cli_edge_prints_the_offline_error_as_one_line_and_exits_2(no_hub, monkeypatch, capsys):
    monkeypatch.setattr(backbones, "hub_reachable", lambda timeout=None: (False, "HF_HUB_OFFLINE is set"))
    monkeypatch.delenv("MEDCBM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as ex:
        with cli_errors(exit=True):
            backbones.load_backbone("whyxrayclip")
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medcbm: backbone whyxrayclip ") and "local-dir:" in err
