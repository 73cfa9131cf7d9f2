"""Latency settings for Flower 1.42's deployment engine that its CLI does not expose.

Flower retries an object that is not yet available (a message whose content is still being
transferred between SuperLink, SuperNode and app) after 1 s, doubling up to 10 s. On a LAN the
content is there milliseconds later, so each hop of a round waited ≈ 1 s for nothing. fedpact's
processes (ServerApp, SuperNode, node executor) start retrying after 20 ms instead, capped at
0.5 s. The defaults live in the keyword defaults of two functions of flwr 1.42; a test fails if
they move.
"""

from __future__ import annotations

INITIAL_BACKOFF = 0.02
BACKOFF_CAP = 0.5


def tune_object_pulls(initial_backoff: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP) -> None:
    """Retry unavailable objects after `initial_backoff` s (Flower: 1 s), at most every `cap` s."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"flwr's {function.__name__} changed; review fedpact.federation."
                               "flower_tuning for this Flower version")
        defaults["initial_backoff"] = initial_backoff
        defaults["backoff_cap"] = cap
