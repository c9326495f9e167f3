"""fedlm's silos run as threads, and numpy parses every array header with `ast.literal_eval`:
on CPython 3.11 two threads parsing while a collection runs a GIL-releasing finaliser made a
silo fail a round ("AST constructor recursion depth mismatch"). The race is provoked here on
purpose (tiny switch interval, collections every few allocations, finalisers that yield)."""

from __future__ import annotations

import gc
import io
import sys
import threading
import time

import numpy as np

import fedlm  # noqa: F401  (installs the lock)


class _Yields:
    def __del__(self) -> None:
        time.sleep(0)  # releases the GIL inside whatever allocation triggered the collection


def test_numpy_headers_parse_in_many_threads_at_once() -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), dtype=np.float32))
    data = buf.getvalue()
    errors: list[BaseException] = []

    def work() -> None:
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not errors:
            try:
                np.load(io.BytesIO(data))
                cycle = _Yields()
                cycle.self = cycle  # type: ignore[attr-defined]  # freed only by the collector
            except SystemError as e:
                errors.append(e)

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(10, 1, 1)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert not errors, errors[0]
