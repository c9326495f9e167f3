"""`ast.parse` made safe to call from several threads at once (installed when fedlm is imported).

CPython 3.11 keeps the AST constructor's recursion depth in per-interpreter state. When a
garbage collection runs a finaliser that releases the GIL in the middle of one thread's
`ast.parse`, another thread's parse moves the same counter, and one of them fails with
"SystemError: AST constructor recursion depth mismatch" (cpython gh-106905). fedlm runs silos
as threads of one process (the in-process engine, valuation, serving), and they all parse:
numpy reads every array header with `ast.literal_eval`, and torch parses source on lazy
imports. A silo once failed a round that way. One lock around `ast.parse` (which
`ast.literal_eval` and `inspect` call through the module) removes the race; parsing is a
negligible part of any round.
"""

from __future__ import annotations

import ast
import threading
from typing import Any

_LOCK = threading.RLock()


def install() -> None:
    """Wrap `ast.parse` in a process-wide lock, once."""
    parse = ast.parse
    if getattr(parse, "_fedlm_locked", False):
        return

    def locked_parse(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return parse(*args, **kwargs)

    locked_parse._fedlm_locked = True  # type: ignore[attr-defined]
    locked_parse.__doc__ = parse.__doc__
    ast.parse = locked_parse
