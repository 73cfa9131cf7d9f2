"""Test harness: a node-side fault hook, to show that the coordinator-side tap catches a bug.

Node processes started with `fault_env(...)` in their environment
(`LoopbackDeployment.start_node(..., env=...)`) load a `sitecustomize` from the harness folder
that, once `fedpact.federation.client_app` is imported, wraps the node's `_send`: while the flag
file names a fault (`UNCLASSIFIED_METRIC`), replies carrying metrics get one more, unclassified
metric and leave without the node's release check — a broken `_send` (on every node and
reply, or on the partner and phase the flag file names after the fault). With the flag file absent
or empty the node's own `_send` runs unchanged. Light on purpose (no Flower, no torch): the
sitecustomize runs in every Python process the node starts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

FAULT_ENV = "FEDPACT_TEST_REPLY_FAULT"  # path of a file naming the fault to inject
UNCLASSIFIED_METRIC = "unclassified-metric"
INJECTED_METRIC = "train-loss"  # the exact statistic nodes used to leak (issue 13, point 3)


_SITECUSTOMIZE = f'''"""fedpact test harness (fedpact.testing.node_fault.fault_env): a node-side fault hook."""
import os

if os.environ.get("{FAULT_ENV}"):
    from fedpact.testing.node_fault import install_fault_hook

    install_fault_hook()
'''


def fault_env(folder: str | Path, flag_file: str | Path) -> dict[str, str]:
    """Extra environment for node processes that may be told to misbehave: while `flag_file`
    holds a fault's name (`UNCLASSIFIED_METRIC`), optionally followed by `partner=NAME` (only the
    node serving that partner dataset) and `phase=train|evaluate` (only those replies), the
    node's `_send` is the broken one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, FAULT_ENV: str(Path(flag_file).resolve())}


def _break_send(client_app) -> None:
    original = client_app._send
    flag = Path(os.environ[FAULT_ENV])

    def _send(msg, phase, content, policy, job):
        fault, *where = (flag.read_text().split() if flag.exists() else [""])
        only = dict(token.split("=", 1) for token in where)
        mine = content["access"]["partner"] if "access" in content else None
        if (fault == UNCLASSIFIED_METRIC and "metrics" in content
                and only.get("partner", mine) == mine and only.get("phase", phase) == phase):
            content["metrics"][INJECTED_METRIC] = 0.6931
            # The bug this drills: a reply leaves without the node's release check.
            return client_app.Message(content=content, reply_to=msg)
        return original(msg, phase, content, policy, job)

    client_app._send = _send


class _ClientAppHook(importlib.abc.MetaPathFinder):
    target = "fedpact.federation.client_app"

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_break(module):
            exec_module(module)
            _break_send(module)

        spec.loader.exec_module = exec_and_break
        return spec


def install_fault_hook() -> None:
    """Called by the harness' sitecustomize in a node process: break `_send` once it is imported."""
    if "fedpact.federation.client_app" in sys.modules:
        _break_send(sys.modules["fedpact.federation.client_app"])
    elif not any(isinstance(f, _ClientAppHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ClientAppHook())
