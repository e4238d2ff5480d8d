"""The ranks' output as it comes: rank-prefixed lines on the screen and in ``ranks.log``.

Used by :mod:`chexlib.launch.launcher` when ``log_output`` is on (``chexlib study
--log-output``): horovodrun's pipes are read line by line (:func:`pump`),
``horovod.run`` writes into a :class:`RankLog`, and ipyparallel engines' output
is polled (:func:`echo_engines`).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

# Horovod's launchers prefix each line of a rank with "[R]<stdout>:" (or a time first).
_HOROVOD_PREFIX = re.compile(r"^[^\[\n]*\[(\d+)\]<std(?:out|err)>:")
_LINE_END = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")


class RankLog:
    """Where the ranks' output goes when it is streamed: ``stream`` and a log file.

    A text stream (``write``/``flush``) that passes on complete lines only,
    each at once (flushed) so a reader sees it as it comes, with Horovod's
    ``[R]<stdout>:`` prefix shortened to ``[R] ``. Lines are kept apart per
    writing thread, so two ranks' forwarders never mix halves of lines.
    Use it as a context manager: the file is opened (appended to, so a resumed
    run keeps the earlier attempt) on entry and closed on exit.

    Args:
        path: the log file (``ranks.log``); its folder is created.
        stream: where lines are shown; None: ``sys.stdout`` at entry (a kernel's
            is the notebook's cell output).
        header: written to the file (only) as ``# <time> <header>`` on entry.
    """

    def __init__(self, path: str | Path, stream=None, header: str = ""):
        self.path, self.stream, self.header = Path(path), stream, header
        self.file = None
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}  # thread id -> start of a line not ended yet

    def __enter__(self) -> RankLog:
        self.stream = self.stream or sys.stdout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {self.header}\n")
        self.file.flush()
        return self

    def write(self, text: str) -> int:
        with self._lock:
            me = threading.get_ident()
            lines = _LINE_END.split(self._partial.pop(me, "") + text)
            if lines[-1]:
                self._partial[me] = lines[-1]
            for line in lines[:-1]:
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        line = _HOROVOD_PREFIX.sub(r"[\1] ", line, count=1)
        with contextlib.suppress(ValueError, OSError):  # a closed or broken stream: keep the file
            self.stream.write(line)
            self.stream.flush()
        self.file.write(line)
        self.file.flush()

    def flush(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.stream.flush()

    def __exit__(self, *exc) -> None:
        with self._lock:
            for rest in self._partial.values():
                self._emit(rest + "\n")
            self._partial.clear()
            self.file.close()


def pump(pipe, keep: deque, log: RankLog | None) -> None:
    """Read a child's pipe line by line: keep the last lines, pass each on to ``log``."""
    for line in pipe:
        keep.append(line.rstrip("\n"))
        if log is not None:
            log.write(line)


def echo_engines(results: dict, shown: dict, log: RankLog, final: bool = False) -> None:
    """Pass the engines' new output to ``log``, complete lines only (all at the end), as ``[R] ``."""
    for rank, ar in results.items():
        for name in ("stdout", "stderr"):
            try:
                text = ar[name]  # what the engine printed so far (ipyparallel keeps it all)
            except Exception:  # noqa: BLE001 - an engine that died has no more output
                continue
            start = shown.get((rank, name), 0)
            end = len(text) if final else text.rfind("\n", start) + 1
            if end > start:
                shown[(rank, name)] = end
                for line in text[start:end].splitlines():
                    log.write(f"[{rank}] {line}\n")
