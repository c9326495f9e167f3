"""Flower's SuperNode with its polls shortened: `flower-supernode`'s own entry point, in a process of fedlm's.

    python -m fedlm.federation.supernode --superlink HOST:PORT ...   # the same arguments as flower-supernode

Before Flower's command line runs, `fedlm.federation.polls` shortens the SuperNode's idle
poll, its wait for the ClientApp's reply and its retries for objects not yet uploaded; see
there for why and what it costs. With FEDLM_HOP_TRACE set it marks its steps (`hops`).
Everything else is Flower's, unchanged.
"""

from __future__ import annotations

import sys

from fedlm.federation.hops import watch_supernode
from fedlm.federation.polls import shorten_object_pull_retries, shorten_supernode_polls


def main(argv: list[str] | None = None) -> None:
    from flwr.supernode.cli import flower_supernode

    shorten_supernode_polls()
    shorten_object_pull_retries()
    watch_supernode()  # FEDLM_HOP_TRACE: the bench's timestamps per hop
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
