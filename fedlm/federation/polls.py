"""Flower 1.42's fixed polling waits, shortened in the processes where fedlm runs Flower's code.

    shorten_object_pull_retries()     # the ServerApp, the SuperNode, each ClientApp child
    shorten_supernode_polls()         # the SuperNode (`python -m fedlm.federation.supernode`)

On a deployed round most of the time beyond the silos' training is Flower waiting on fixed
timers, not moving bytes, and Flower 1.42 has no setting for any of them:

- a SuperNode with no message sleeps 3 s before it asks the SuperLink again, and while its
  ClientApp works it looks for the reply every 0.5 s (`start_client_internal`: `time.sleep(3)`,
  `time.sleep(0.5)`);
- the SuperLink hands out a message (an instruction to a SuperNode, a reply to the ServerApp)
  as soon as its header arrives, before its objects have all been uploaded, and whoever pulls
  it retries a missing object after 1 s, 2 s, 4 s ... up to 10 s (`pull_objects`' backoff).

Patching Flower's internals, argued: the alternatives are a fork of Flower or a transport of
our own, each far more code to keep in step; the two patches change only how long a poll
waits, never what is sent or checked, so a failure shows as a slower round, not a wrong one.
They are pinned to `flwr==1.42.*` (pyproject) and `tests/test_federation_deploy.py` checks that
each still finds what it patches and that a deployed round is the in-process one bit for bit.
What polling faster costs: each idle SuperNode sends the SuperLink a small signed request every
`IDLE_POLL_SECONDS` instead of every 3 s.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

IDLE_POLL_SECONDS = 0.25
"""A SuperNode's wait between asks for work (Flower: 3 s) and for its ClientApp's reply (0.5 s)."""

PULL_RETRY_SECONDS, PULL_RETRY_CAP_SECONDS = 0.05, 0.2
"""Retry a not-yet-uploaded object after 50 ms, doubling up to 0.2 s (Flower: 1 s doubling up to 10 s).
A launcher's child starts pulling as soon as its SuperNode has a message's header, and waits out
its SuperNode's own pull of the content in these retries: the cap is the delay it can add after
the content is there, on each way of every round."""

PULL_GIVE_UP_SECONDS = 300.0
"""How long a pull waits for content that is not uploaded (Flower: 500 tries, minutes at its waits). The
ServerApp's pulls end sooner, at their exchange's deadline (`replies`)."""

FLOWER_IDLE_SLEEP = "time.sleep(3)"
"""The statement of Flower 1.42's SuperNode loop that `shorten_supernode_polls` shortens."""


class Backoff:
    """Waits for a poll that is usually empty: `first` seconds after activity, doubling up to `cap`.

    Each poll of a Flower API is an HTTP request that costs the server CPU, which on a small
    machine the silos' training needs; asking often only right after activity keeps the
    latency low when an answer is due and the cost low while a silo trains. With `share` > 0 the
    cap grows with the time waited since activity, to `share` of it (at most `ceiling`): a long
    wait (a silo training a large model for minutes) is polled less often, and an answer is seen
    at most that share of the wait late."""

    def __init__(self, first: float, cap: float, *, share: float = 0.0, ceiling: float = 0.0) -> None:
        self.first, self.cap, self.share, self.ceiling = first, cap, share, max(cap, ceiling)
        self.next, self.waited = first, 0.0

    def reset(self) -> None:
        self.next, self.waited = self.first, 0.0

    def wait(self) -> None:
        time.sleep(self.next)
        self.waited += self.next
        cap = max(self.cap, min(self.ceiling, self.share * self.waited))
        self.next = min(self.next * 2, cap)


def shorten_object_pull_retries() -> None:
    """Make Flower's object pulls in this process retry sooner (`pull_objects`' keyword defaults;
    every caller in Flower 1.42 leaves them at their defaults)."""
    from flwr.supercore.inflatable import inflatable_utils

    kw = inflatable_utils.pull_objects.__kwdefaults__
    if kw is None or not {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= set(kw):
        raise RuntimeError("flwr's pull_objects has no initial_backoff/backoff_cap: fedlm needs flwr 1.42")
    kw["initial_backoff"], kw["backoff_cap"] = PULL_RETRY_SECONDS, PULL_RETRY_CAP_SECONDS
    # Flower gives up after 500 tries, which its shorter waits would make a shorter time: give up by time
    kw["max_tries_per_object"], kw["max_time"] = None, PULL_GIVE_UP_SECONDS


def shorten_supernode_polls() -> None:
    """Make the SuperNode loop in this process wait at most `IDLE_POLL_SECONDS` per poll: its module's
    `time` is replaced by one whose `sleep` is capped (it uses `time` for those sleeps alone)."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    if FLOWER_IDLE_SLEEP not in inspect.getsource(loop) or loop.time is not time:
        raise RuntimeError("flwr's SuperNode loop is not the one fedlm patches: fedlm needs flwr 1.42")
    clock = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    clock["sleep"] = lambda seconds: time.sleep(min(seconds, IDLE_POLL_SECONDS))
    loop.time = SimpleNamespace(**clock)  # type: ignore[assignment]
