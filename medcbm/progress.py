# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Progress bars for long jobs (tqdm, on stderr) and a one-line summary when a job ends.

.. code-block:: python

    from medcbm.progress import progress

    for batch in progress(loader, total=len(dataset), desc="features", unit="img", step=lambda b: len(b)):
        ...
    # stderr: features: 100%|#####| 1000/1000 [00:20<00:00, 49.8img/s]
    #         medcbm: features: 1000 img in 20.1 s (49.8 img/s)

    with progress(total=n_images, desc="inference") as bar:   # manual updates
        bar.update(len(batch))

``MEDCBM_PROGRESS=0`` silences both the bar and the summary. When stderr is not a terminal (a log file,
CI) the bar is redrawn at most every 30 s so logs stay short; the summary is always one line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

__all__ = ["Progress", "progress", "progress_enabled", "format_summary"]

T = TypeVar("T")
_TTY_INTERVAL_S = 0.5
_LOG_INTERVAL_S = 30.0


def progress_enabled() -> bool:
    """``False`` when the environment variable ``MEDCBM_PROGRESS`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("MEDCBM_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def format_summary(desc: str, count: float, seconds: float, unit: str = "img", rate: bool = True) -> str:
    """``"<desc>: <count> <unit> in <s> s (<rate> <unit>/s)"`` (rate omitted when off or for an empty run)."""
    n = int(count) if float(count).is_integer() else round(float(count), 2)
    per_s = f" ({count / seconds:.1f} {unit}/s)" if rate and seconds > 0 and count > 0 else ""
    return f"{desc}: {n} {unit} in {seconds:.1f} s{per_s}"


class Progress(Generic[T]):
    """A progress bar over an iterable or updated by hand; prints a summary line when closed.

    The bar goes to stderr with units per second, and the summary line follows at the end. Iterate it
    (``for x in progress(items, desc="features")``) or use it as a context manager and call ``update(n)``.
    Quiet when ``MEDCBM_PROGRESS=0`` or ``enabled=False``. :data:`progress` is another name for this class.

    Args:
        iterable: what to iterate (optional; use :meth:`update` without one).
        total: expected count in ``unit`` (default ``len(iterable)`` when it has one).
        desc: what the job is (``"features"``, ``"inference"``).
        unit: what is counted (``"img"``, ``"concept"``, ``"step"``).
        step: for iteration, how many units one item is (e.g. ``len`` of a batch); default 1.
        enabled: show anything at all (default :func:`progress_enabled`).
        file: where to write (default ``sys.stderr``).
        summary: print the summary line on close.
        rate: show units per second (off for coarse units such as the steps of a fit).
    """

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        total: float | None = None,
        desc: str = "medcbm",
        unit: str = "img",
        step: Callable[[T], float] | None = None,
        enabled: bool | None = None,
        file: IO[str] | None = None,
        summary: bool = True,
        rate: bool = True,
    ) -> None:
        self.rate = rate
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__") and step is None:
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.step = step
        self.enabled = progress_enabled() if enabled is None else bool(enabled)
        self.file = file if file is not None else sys.stderr
        self.summary = summary
        self.count: float = 0
        self.start = time.perf_counter()
        self.seconds: float | None = None
        self._closed = False
        self._bar: Any = None
        if self.enabled:
            from tqdm.auto import tqdm

            tty = bool(getattr(self.file, "isatty", lambda: False)())
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                file=self.file,
                leave=False,
                dynamic_ncols=tty,
                mininterval=_TTY_INTERVAL_S if tty else _LOG_INTERVAL_S,
                maxinterval=_LOG_INTERVAL_S,
            )

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1 if self.step is None else self.step(item))
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, text: str) -> None:
        """Show a short status next to the bar (e.g. the current stage)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self, summary: bool | None = None) -> str:
        """End the bar and print the summary line (once; ``summary=False``: not at all, e.g. on failure).

        Returns:
            The summary text.
        """
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        text = format_summary(self.desc, self.count, self.seconds, self.unit, self.rate)
        if summary is not None:
            self.summary = summary
        if self._closed:
            return text
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self.enabled and self.summary:
            print(f"medcbm: {text}", file=self.file, flush=True)
        return text

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


progress = Progress
"""The factory name the call sites use: ``progress(items, desc="features")`` is ``Progress(items, desc="features")``."""
