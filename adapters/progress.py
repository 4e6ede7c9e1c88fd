"""One progress display for every long piece of work (training, calibration, edits, the demo, benchmarks):
tqdm bars, with elapsed time, rate and ETA, on stderr.

Bars show when stderr is a terminal. ``CONCEPTGATE_PROGRESS=0`` turns them off everywhere;
``CONCEPTGATE_PROGRESS=1`` turns them on even without a terminal (then redrawn at most every 30 s, in
ASCII, so that a log file stays readable). Without a terminal and without the variable they stay off, so
CI logs get no carriage-return spam. :func:`write` prints a log line without tearing an open bar.

tqdm is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import sys

ENV = "CONCEPTGATE_PROGRESS"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def enabled(requested: bool | None = None) -> bool:
    """Whether a bar would show: ``requested=False`` (e.g. ``--no-progress``) and ``CONCEPTGATE_PROGRESS=0``
    always win; ``CONCEPTGATE_PROGRESS=1`` forces bars on; otherwise bars show on a terminal."""
    env = os.environ.get(ENV, "").strip().lower()
    if requested is False or env in _OFF:
        return False
    if env in _ON:
        return True
    return _isatty(sys.stderr)


# a host's own progress display (ComfyUI's frontend bar), fed by every bar: factory(total) -> obj.update(n)
_HOST_BARS: list = []


def register_host_bar(factory) -> None:
    """Also show every bar with a known total in the host's own display (``factory(total)`` returns an object
    with ``update(n)``; ComfyUI's glue registers ``comfy.utils.ProgressBar``, drawn on the running node)."""
    if factory not in _HOST_BARS:
        _HOST_BARS.append(factory)


class _Tee:
    """A tqdm bar that also advances the host's bars (every other attribute is the tqdm bar's)."""

    def __init__(self, inner, hosts):
        self._inner, self._hosts = inner, hosts

    def update(self, n=1):
        for h in self._hosts:
            try:
                h.update(n)
            except Exception:  # a display must never stop the work (ComfyUI's interrupt is raised elsewhere)
                pass
        return self._inner.update(n)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._inner.close()
        return False

    def __iter__(self):
        return iter(self._inner)


def bar(total: int | float | None = None, desc: str = "", *, unit: str = "it", initial: int = 0,
        show: bool | None = None, leave: bool = True, **kw):
    """A tqdm bar on stderr (disabled -- a no-op object with the same methods -- when :func:`enabled` says
    so). ``show``: the caller's own switch (``False`` for ``--no-progress``); extra keywords go to tqdm.
    With a total, hosts' registered displays (:func:`register_host_bar`) advance with it."""
    from tqdm import tqdm

    on = enabled(show)
    tty = _isatty(sys.stderr)
    opts = dict(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=sys.stderr, disable=not on,
                dynamic_ncols=tty, mininterval=0.5 if tty else 30.0, ascii=None if tty else True)
    opts.update(kw)
    inner = tqdm(**opts)
    if total and _HOST_BARS and show is not False:
        hosts = []
        for factory in _HOST_BARS:
            try:
                hosts.append(factory(int(total)))
            except Exception:
                pass
        if hosts:
            return _Tee(inner, hosts)
    return inner


def iterate(iterable, desc: str = "", *, total: int | None = None, show: bool | None = None, **kw):
    """``iterable`` with a bar (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    b = bar(total, desc, show=show, **kw)
    try:
        for item in iterable:
            yield item
            b.update(1)
    finally:
        b.close()


def write(msg: str, file=None) -> None:
    """Print ``msg`` (stdout by default) above any open bar: the bar is cleared and drawn again below."""
    file = file if file is not None else sys.stdout
    if "tqdm" in sys.modules:  # a bar can only be open if tqdm was imported
        from tqdm import tqdm

        tqdm.write(msg, file=file)
        file.flush()
        return
    print(msg, file=file, flush=True)


__all__ = ["ENV", "bar", "enabled", "iterate", "register_host_bar", "write"]
