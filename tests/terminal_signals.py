"""Children that get signals the way a terminal delivers them."""

from __future__ import annotations

import signal


def default_signal_actions() -> None:
    """``preexec_fn`` for a child these tests send SIGINT or SIGHUP: both at their default
    actions. A test run started in the background (``cmd &``) inherits SIGINT ignored and one
    under ``nohup`` SIGHUP ignored; Python keeps an inherited "ignore", and the child would
    never see the signal the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
