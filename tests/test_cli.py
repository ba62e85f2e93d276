# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The command-line edge: unknown options are refused, user errors end in one line and exit status 2."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile

import pytest
from conftest import REPO, bundle_command

from medcbm.data import InputListError
from medcbm.errors import MedcbmUserError, ModelsDirError, OutputDirError, UnknownOptionError
from medcbm.workflows import cli
from medcbm.workflows.cli import (
    check_cli_options,
    check_models_dir,
    check_output_dir,
    cli_errors,
    in_bundle_cli,
    nearest_option,
    parse_cli_options,
    user_error_message,
)

MAIN = "/site-packages/monai/bundle/__main__.py"
B = "bundles/blood_cbm"
BASE = [MAIN, "run", "--bundle_root", B, "--config_file", f"{B}/configs/inference.yaml", "--workflow_type", "infer"]


# ------------------------------------------------------------------ options
def test_parse_cli_options_reads_options_as_fire_does():
    got = parse_cli_options(["--a", "1", "--b=2", "--flag", "--c-d", "x", "pos", "--e#f", "3", "--", "--after", "4"])
    assert got == {"a": "1", "b": "2", "flag": None, "c_d": "x", "e#f": "3"}


def test_in_bundle_cli_only_for_monai_bundle_run():
    assert in_bundle_cli(BASE)
    assert not in_bundle_cli([MAIN, "download_large_files"])
    assert not in_bundle_cli(["/usr/bin/pytest", "run"])


def test_unknown_option_names_itself_and_the_nearest_known_option():
    with pytest.raises(UnknownOptionError) as err:
        check_cli_options([*BASE, "--input_dir", "X", "--output_dir", "o"], force=True)
    msg = str(err.value)
    assert "--input_dir" in msg and "did you mean --input?" in msg


@pytest.mark.parametrize(
    "option",
    [
        "--input",  # a config key
        "--output-dir",  # fire's dashes
        "--meta_file",  # the runner's own
        "--run_id",
        "--properties_path",
        "--evaluator#batch_size",  # a nested key
        "--evaluator#not_listed_but_a_kwarg",  # under a _target_ component anything may be an argument
        "--_meta_#version",  # MONAI's reserved sections
    ],
)
def test_known_options_pass(option):
    check_cli_options([*BASE, option, "1"], force=True)


@pytest.mark.parametrize(
    "option, reason",
    [("--inptu", "did you mean --input?"), ("--run#7", "run is a list of"), ("--modelsdir", "--models_dir")],
)
def test_misspelt_and_impossible_nested_options_are_refused(option, reason):
    with pytest.raises(UnknownOptionError, match=reason.replace("?", r"\?")):
        check_cli_options([*BASE, option, "1"], force=True)


def test_options_are_checked_against_every_config_file_named():
    extra = REPO / "bundles" / "blood_cbm" / "configs" / "inference.yaml"
    argv = [MAIN, "run", "--config_file", f"['{extra}', '{extra}']", "--batch_size", "2"]
    check_cli_options(argv, force=True)
    with pytest.raises(UnknownOptionError):
        check_cli_options([*argv, "--batchsize", "2"], force=True)


def test_outside_the_bundle_command_nothing_is_checked():
    check_cli_options(["/usr/bin/pytest", "--input_dir", "X"])  # not forced, not monai.bundle run: no error


def test_nearest_option_prefers_the_same_first_word():
    known = {"input", "output_dir", "models_dir"}
    assert nearest_option("input_dir", known) == "input"
    assert nearest_option("outdir", known) == "output_dir"
    assert nearest_option("zzz", known) is None


# ------------------------------------------------------------------ folders
def test_check_output_dir_creates_a_writable_folder(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe leaves nothing behind


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OutputDirError, match=r"--output_dir .*file\.txt is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputDirError, match="a parent of it is a file"):
        check_output_dir(f / "sub")


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only")]
)
def test_unwritable_output_dir_says_why(tmp_path, monkeypatch, code, words):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "x"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", fail)  # running as root, chmod cannot make it fail
    with pytest.raises(OutputDirError, match=f"cannot be written: {words}"):
        check_output_dir(tmp_path / "out")


def test_check_models_dir(tmp_path):
    assert check_models_dir(None) is None
    with pytest.raises(ModelsDirError, match="does not exist"):
        check_models_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("")
    with pytest.raises(ModelsDirError, match="is a file"):
        check_models_dir(tmp_path / "f")
    with pytest.raises(ModelsDirError, match="lacks cbm.safetensors"):
        check_models_dir(tmp_path, required=["cbm.safetensors"])
    (tmp_path / "cbm.safetensors").write_text("")
    assert check_models_dir(tmp_path, required=["cbm.safetensors"]) == tmp_path


# ------------------------------------------------------------------ the one-line exit
def test_cli_errors_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.delenv("MEDCBM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as ex:
        with cli_errors(exit=True):
            raise OutputDirError("--output_dir /x is a file,\n not a folder")
    assert ex.value.code == 2
    assert capsys.readouterr().err == "medcbm: --output_dir /x is a file, not a folder\n"


def test_cli_errors_finds_the_user_error_under_a_wrapper(monkeypatch, capsys):
    """MONAI wraps what a config expression raises in RuntimeError('Failed to evaluate ...')."""
    monkeypatch.delenv("MEDCBM_DEBUG", raising=False)

    @cli_errors(exit=True)
    def job():
        try:
            raise InputListError("in.csv", "has no column 'image'")
        except InputListError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e

    with pytest.raises(SystemExit):
        job()
    assert capsys.readouterr().err == "medcbm: in.csv: has no column 'image'\n"


def test_disk_full_anywhere_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("MEDCBM_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        with cli_errors(exit=True):
            raise OSError(errno.ENOSPC, "No space left on device", "/out/predictions.csv")
    err = capsys.readouterr().err
    assert err.startswith("medcbm: /out/predictions.csv: no space left on the device") and err.count("\n") == 1


def test_bugs_and_library_callers_keep_the_exception(monkeypatch):
    monkeypatch.delenv("MEDCBM_DEBUG", raising=False)
    with pytest.raises(KeyError):  # not a user error: the traceback is the useful output
        with cli_errors(exit=True):
            raise KeyError("bug")
    with pytest.raises(OutputDirError):  # exit=False, or None outside the bundle command
        with cli_errors(exit=False):
            raise OutputDirError("x")
    with pytest.raises(OutputDirError):
        with cli_errors():
            raise OutputDirError("x")
    monkeypatch.setenv("MEDCBM_DEBUG", "1")
    with pytest.raises(OutputDirError):
        with cli_errors(exit=True):
            raise OutputDirError("x")
    assert user_error_message(ValueError("plain")) is None
    assert issubclass(OutputDirError, MedcbmUserError) and issubclass(UnknownOptionError, MedcbmUserError)
    assert cli.RUNNER_OPTIONS <= cli.known_cli_options({})


# ------------------------------------------------------------------ the real bundle command
def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MEDCBM_PROGRESS": "0", **(env or {})}
    full_env.pop("MEDCBM_DEBUG", None)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=full_env)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_bundle_refuses_an_unknown_option(tmp_path):
    proc = _run(*bundle_command("blood_cbm", "inference.yaml", "--workflow_type", "infer", "--input_dir", "X",
                                "--output_dir", str(tmp_path / "out")))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _last_line(proc).startswith("medcbm: unknown option --input_dir") and "--input?" in _last_line(proc)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "predictions.csv").exists()


def test_bundle_output_path_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "predictions_here"
    f.write_text("not a folder")
    proc = _run(*bundle_command("blood_cbm", "inference.yaml", "--workflow_type", "infer", "--output_dir", str(f)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _last_line(proc).startswith("medcbm: ") and str(f) in _last_line(proc) and "is a file" in _last_line(proc)
    assert "Traceback" not in proc.stderr and f.read_text() == "not a folder"


def test_bundle_offline_hub_backbone_is_one_line(tmp_path):
    proc = _run(*bundle_command("cxr_cbm", "inference.yaml", "--workflow_type", "infer", "--backbone", "whyxrayclip",
                                "--output_dir", str(tmp_path / "out")))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = _last_line(proc)
    assert last.startswith("medcbm: backbone whyxrayclip") and "local-dir:" in last and "download_large_files" in last
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr


def test_bundle_missing_models_dir_is_one_line(tmp_path):
    missing = tmp_path / "no_models_here"
    proc = _run(*bundle_command("blood_cbm", "inference.yaml", "--workflow_type", "infer", "--models_dir", str(missing),
                                "--output_dir", str(tmp_path / "out")))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _last_line(proc).startswith("medcbm: ") and str(missing) in _last_line(proc)
    assert "Traceback" not in proc.stderr
