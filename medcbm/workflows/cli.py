# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The command-line edge of the bundle jobs: refuse unknown options, and end user errors in one line.

``python -m monai.bundle run ...`` hands every ``--key value`` pair to the config as an override, so a
misspelt option (``--input_dir X``) would otherwise be silently ignored, and an error deep in a job
would end in a MONAI traceback. The helpers here are used by the runners and the bundle configs:

.. code-block:: yaml

    initialize:
      - "$medcbm.workflows.cli.check_cli_options()"     # exit 2 on an unknown --option

.. code-block:: python

    @cli_errors()                                      # exit 2 with "medcbm: <reason>" on a user error
    def run(self): ...
    out = check_output_dir(self.output_dir)            # creates it, proves it is writable

Outside the bundle command (tests, notebooks) :func:`cli_errors` re-raises, so Python callers get the
exception; set ``MEDCBM_DEBUG=1`` to get the full traceback on the command line too.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import errno
import inspect
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import MedcbmUserError, ModelsDirError, OutputDirError, UnknownOptionError
from ..transforms import FileReasonError
from ..options import is_unset

__all__ = [
    "RUNNER_OPTIONS",
    "in_bundle_cli",
    "parse_cli_options",
    "known_cli_options",
    "nearest_option",
    "check_cli_options",
    "check_output_dir",
    "check_models_dir",
    "user_error_message",
    "cli_errors",
    "exit_user_error",
]

#: Options of ``python -m monai.bundle run`` itself (``monai.bundle.scripts.run``, ``create_workflow``,
#: ``ConfigWorkflow``); the rest of the command line are config overrides. Completed at runtime from the
#: signatures of the installed MONAI in :func:`known_cli_options`.
RUNNER_OPTIONS: frozenset[str] = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
        "bundle_root",
    }
)
_BUNDLE_SUBCOMMANDS = ("run", "run_workflow")
_OS_USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
}


def in_bundle_cli(argv: Sequence[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle run ...`` (not pytest, not a notebook)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        return False
    main = Path(argv[0]).as_posix()
    return main.endswith("monai/bundle/__main__.py") and argv[1] in _BUNDLE_SUBCOMMANDS


def parse_cli_options(argv: Sequence[str]) -> dict[str, str | None]:
    """The ``--key value`` / ``--key=value`` options after the subcommand, as python-fire reads them.

    Fire turns ``-`` into ``_`` in names; a ``--key`` followed by another option (or nothing) is a flag
    (value ``None``). A bare ``--`` ends the options. Positional words are ignored.
    """
    out: dict[str, str | None] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            break
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            name = name.replace("-", "_")
            if eq:
                out[name] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[name] = args[i + 1]
                i += 1
            else:
                out[name] = None
        i += 1
    return out


def _as_file_list(value: Any) -> list[str]:
    """``--config_file`` as fire passes it: a path, a list literal, or a comma-separated list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [p.strip() for p in text.split(",") if p.strip()]


def _runner_signature_options() -> set[str]:
    """Parameter names of the installed MONAI's runner, so a newer MONAI's options are known too."""
    names: set[str] = set()
    try:
        from monai.bundle import ConfigWorkflow
        from monai.bundle import scripts

        for fn in (scripts.run, scripts.create_workflow, ConfigWorkflow.__init__):
            for p in inspect.signature(fn).parameters.values():
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                    names.add(p.name)
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - MONAI always has them
        pass
    return names


def _load_config(files: Sequence[str]) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    try:
        return dict(ConfigParser.load_config_files(list(files)))
    except Exception as e:  # a missing or broken config is MONAI's to report, with its own message
        raise MedcbmUserError(f"cannot read --config_file {', '.join(files)}: {e}") from e


def known_cli_options(config: Mapping[str, Any] | None = None) -> set[str]:
    """Top-level option names the command line may carry: the runner's own plus the config's keys."""
    return set(RUNNER_OPTIONS) | _runner_signature_options() | set((config or {}).keys())


def _check_nested(option: str, config: Mapping[str, Any]) -> str | None:
    """Why ``--a#b#c`` names nothing in ``config`` (or ``None`` when it does, or cannot be checked).

    A key under a ``_target_`` component is accepted even if the config does not list it: it may be
    another argument of the target.
    """
    parts = option.split("#")
    node: Any = config
    for depth, part in enumerate(parts):
        if isinstance(node, Mapping):
            if part in node:
                node = node[part]
                continue
            if "_target_" in node:
                return None
            where = "#".join(parts[:depth]) or "the config"
            near = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            hint = f" (did you mean --{'#'.join(parts[:depth] + [near[0]])}?)" if near else ""
            return f"unknown option --{option}: {where} has no key {part!r}{hint}"
        if isinstance(node, list):
            if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                return f"unknown option --{option}: {'#'.join(parts[:depth])} is a list of {len(node)} items"
            node = node[int(part)]
            continue
        return None  # below a scalar: MONAI will report it
    return None


def nearest_option(name: str, known: Iterable[str], cutoff: float = 0.5) -> str | None:
    """The known option most like ``name``: difflib similarity, favouring one with the same first word.

    ``input_dir`` is nearer to ``input`` than to ``output_dir`` although difflib alone rates the latter higher.
    """
    first = name.split("_", 1)[0]
    best, best_score = None, cutoff
    for k in sorted(known):
        ratio = difflib.SequenceMatcher(None, name, k).ratio()
        if ratio < cutoff:
            continue
        score = ratio + (0.5 if k.split("_", 1)[0] == first else 0.0)
        if score > best_score:
            best, best_score = k, score
    return best


def check_cli_options(
    argv: Sequence[str] | None = None, config: Mapping[str, Any] | None = None, force: bool = False
) -> None:
    """Refuse options on the bundle command line that neither MONAI's runner nor the config knows.

    Call it from a config's ``initialize`` list (``"$medcbm.workflows.cli.check_cli_options()"``): it reads
    ``sys.argv`` and the ``--config_file`` (or the ``config_file`` of ``--args_file``) named there. Outside
    the bundle command it does nothing unless ``force``.

    Args:
        argv: the command line (default ``sys.argv``); options are read after the subcommand.
        config: the merged config (default: loaded from the ``--config_file`` on the command line).
        force: check even when ``argv`` is not a ``monai.bundle run`` command line.

    Raises:
        UnknownOptionError: names the option and the nearest known one; under the bundle command the
            process instead prints ``medcbm: <reason>`` and exits 2.
    """
    argv = list(sys.argv if argv is None else argv)
    if not force and not in_bundle_cli(argv):
        return
    with cli_errors(exit=None if not force else False):
        _check_cli_options(argv, config)


def _check_cli_options(argv: Sequence[str], config: Mapping[str, Any] | None) -> None:
    start = 2 if in_bundle_cli(argv) else next((i + 1 for i, a in enumerate(argv) if a in _BUNDLE_SUBCOMMANDS), 1)
    options = parse_cli_options(argv[start:])
    if config is None:
        files = _as_file_list(options.get("config_file"))
        if not files and options.get("args_file"):
            args = _load_config([str(options["args_file"])])
            files = _as_file_list(args.get("config_file"))
        config = _load_config(files) if files else {}
    known = known_cli_options(config)
    for name in options:
        root = name.split("#", 1)[0]
        if root.startswith("_") and root.endswith("_"):  # _meta_, _requires_: MONAI's reserved sections
            continue
        if root not in known:
            near = nearest_option(root, known)
            hint = f"; did you mean --{near}?" if near else ""
            raise UnknownOptionError(f"unknown option --{name} (not a key of the config or of monai.bundle run){hint}")
        if "#" in name:
            reason = _check_nested(name, config)
            if reason:
                raise UnknownOptionError(reason)


def check_output_dir(path: str | os.PathLike[str], option: str = "--output_dir") -> Path:
    """Create the output folder if needed and prove it is writable (a small temporary file).

    Raises:
        OutputDirError: the path is a file, or the folder cannot be created or written (read-only,
            permission denied, disk full); the message names the folder, the reason and the option.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{option} {out} is a file, not a folder; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".medcbm_write_check_", delete=True) as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        reason = _OS_USER_ERRNOS.get(e.errno or -1, e.strerror or type(e).__name__)
        if e.errno == errno.ENOTDIR or (e.errno == errno.EEXIST and not out.is_dir()):
            reason = "a parent of it is a file, not a folder"
        raise OutputDirError(f"{option} {out} cannot be written: {reason}; choose another folder") from e
    return out


def check_models_dir(path: str | os.PathLike[str] | None, required: Sequence[str] = ()) -> Path | None:
    """A ``--models_dir`` must be an existing folder holding ``required`` files (``None`` passes through).

    Raises:
        ModelsDirError: names the folder and what is missing.
    """
    if is_unset(path):
        return None
    folder = Path(path)  # type: ignore[arg-type]
    if not folder.exists():
        raise ModelsDirError(
            f"--models_dir {folder} does not exist (train.yaml writes one; or use the bundle's models/)"
        )
    if not folder.is_dir():
        raise ModelsDirError(f"--models_dir {folder} is a file, not a folder")
    missing = [r for r in required if not (folder / r).exists()]
    if missing:
        raise ModelsDirError(f"--models_dir {folder} lacks {', '.join(missing)}; is it a folder written by train.yaml?")
    return folder


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def user_error_message(exc: BaseException) -> str | None:
    """The one-line reason for a user error anywhere in ``exc``'s cause chain, or ``None`` for a bug.

    User errors: :class:`~medcbm.errors.MedcbmUserError`, a file+reason error (e.g. an unreadable input
    list), and OS errors about the user's files or disk (full, read-only, permission denied, missing).
    """
    for e in _chain(exc):
        if isinstance(e, MedcbmUserError):
            return _one_line(str(e))
    for e in _chain(exc):
        if isinstance(e, FileReasonError):
            return _one_line(str(e))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _OS_USER_ERRNOS:
            where = e.filename if e.filename is not None else "a file"
            hint = (
                "; free space or choose another --output_dir"
                if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
                else ""
            )
            return _one_line(f"{where}: {_OS_USER_ERRNOS[e.errno]}{hint}")
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def exit_user_error(message: str, code: int = 2) -> None:
    """Print ``medcbm: <message>`` to stderr as one line and exit with ``code``."""
    sys.stdout.flush()
    print(f"medcbm: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


class cli_errors(contextlib.ContextDecorator):
    """Context manager / decorator: a user error inside ends the process with one line and exit 2.

    Args:
        exit: ``True`` always exit, ``False`` never (re-raise), ``None`` (default) exit only under the
            bundle command (:func:`in_bundle_cli`), so library callers and tests get the exception.
            ``MEDCBM_DEBUG=1`` always re-raises (full traceback).

    Example:
        .. code-block:: python

            with cli_errors():
                out = check_output_dir(output_dir)
    """

    def __init__(self, exit: bool | None = None) -> None:
        self.exit = exit

    def __enter__(self) -> cli_errors:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        should_exit = in_bundle_cli() if self.exit is None else self.exit
        if not should_exit or os.environ.get("MEDCBM_DEBUG", "") not in ("", "0"):
            return False
        message = user_error_message(exc)
        if message is None:
            return False
        exit_user_error(message, getattr(exc, "exit_code", 2) if isinstance(exc, MedcbmUserError) else 2)
        return True  # pragma: no cover - sys.exit raised
