"""Test harness: fedpact's ServerApp with every reply tapped (`reply_tap.submit_tapped_job`).

The app bundle of a tapped job names this module's `app`; it runs in the ServerApp process the
SuperLink starts for that one run, so patching `server_app.run_job` here touches nothing else.
"""

from __future__ import annotations

import fedpact.federation.server_app as server_app
from fedpact.testing.reply_tap import ReplyTap, tap_path

_run_job = server_app.run_job


def _tapped_run_job(grid, job, *args, **kwargs):
    return _run_job(ReplyTap(grid, tap_path(job)), job, *args, **kwargs)


server_app.run_job = _tapped_run_job
app = server_app.make_server_app()
