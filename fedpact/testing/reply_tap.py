"""Test harness: what partner nodes actually send on Flower's deployment engine (issue 13).

A node checks every reply against `fedpact.privacy.releases` before sending it
(`client_app._send`); a test that only trusted that check would miss a bug in it. This module
taps the replies where the coordinator receives them instead, in the ServerApp process that the
SuperLink starts:

- `submit_tapped_job` submits a job whose app bundle names `fedpact.testing.tap_server_app:app`
  (fedpact's own ServerApp, its Grid wrapped in `ReplyTap`) instead of
  `fedpact.federation.server_app:app`; the ClientApp component is unchanged, so the nodes run
  the job exactly as any other. Every reply the coordinator pulls is written, field by field
  (arrays as shape and dtype), to `tapped-replies.jsonl` in the job's folder (`read_tap`).
- `release_problems` checks every field of every tapped reply against the classification — its
  own walk over `releases.classify`, not the node's `check_reply`.
- `fault_env` (`node_fault`) is the fault-injection hook for the negative test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedpact.federation.rounds import DelegatingGrid
from fedpact.privacy.releases import NON_PRIVATE_MODEL, Protection, classify

from .node_fault import INJECTED_METRIC, UNCLASSIFIED_METRIC, fault_env  # noqa: F401 - re-exported

TAP_FILE = "tapped-replies.jsonl"
TAP_SERVER_APP = "fedpact.testing.tap_server_app:app"
PHASES = ("query", "train", "evaluate")


# ------------------------------------------------------------------ the coordinator-side tap

def tap_path(job) -> Path:
    return Path(job.job_dir) / TAP_FILE


def _value(value):
    """A JSON form of one field value: scalars and lists as they are, bytes by length."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def describe_reply(msg) -> dict:
    """Everything in one reply Message: its kind, sender, error, and every field of every record."""
    from flwr.app import ArrayRecord

    meta = msg.metadata
    doc = {"phase": str(meta.message_type).split(".")[-1].lower(),
           "message_type": str(meta.message_type), "src_node_id": int(meta.src_node_id),
           "message_id": str(meta.message_id), "error": None, "records": {}}
    if msg.has_error():
        doc["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
        return doc
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            fields = {key: {"shape": list(array.shape), "dtype": str(array.dtype)}
                      for key, array in record.items()}
        else:
            fields = {key: _value(value) for key, value in record.items()}
        doc["records"][name] = {"type": type(record).__name__, "fields": fields}
    return doc


class ReplyTap(DelegatingGrid):
    """The coordinator's Grid, appending every reply it receives to a JSON-lines file."""

    def __init__(self, grid, path: Path) -> None:
        super().__init__(grid)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _keep(self, replies) -> list:
        replies = list(replies)
        with self.path.open("a") as handle:
            for msg in replies:
                handle.write(json.dumps(describe_reply(msg)) + "\n")
        return replies

    def pull_messages(self, message_ids):  # noqa: D102 - Grid interface
        return self._keep(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return self._keep(self._grid.send_and_receive(messages, timeout=timeout))


def write_tapped_job_app(job, directory: str | Path) -> Path:
    """`deployment.write_job_app`, with the tapping ServerApp as the bundle's serverapp."""
    from fedpact.federation.deployment import write_job_app

    directory = write_job_app(job, directory)
    pyproject = directory / "pyproject.toml"
    text = pyproject.read_text()
    plain = 'serverapp = "fedpact.federation.server_app:app"'
    assert plain in text, "write_job_app changed its serverapp component line"
    pyproject.write_text(text.replace(plain, f'serverapp = "{TAP_SERVER_APP}"'))
    return directory


def submit_tapped_job(connection, job) -> int:
    """`deployment.submit_job` with the tap: returns the Flower run id."""
    from fedpact.federation.deployment import flwr_cli, refuse_unsupported

    refuse_unsupported(job)
    app = write_tapped_job_app(job, job.job_dir / "app")
    doc = flwr_cli(connection, "run", str(app), connection.name)
    return int(doc["run-id"])


def read_tap(job) -> list[dict]:
    path = tap_path(job)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ the check, field by field

def _scalars(value) -> bool:
    if isinstance(value, list):
        return all(_scalars(v) for v in value)
    return isinstance(value, bool | int | float | str) or (isinstance(value, dict)
                                                          and set(value) == {"bytes"})


def release_problems(replies: Iterable[Mapping], allowed: Iterable[str], *,
                     dp: bool = True) -> list[str]:
    """Every field of every tapped reply against `releases.classify` and the node policy's
    `allowed` non-private releases; one line per problem (empty: all fields classified and
    allowed). Its own walk, independent of the node's `check_reply`."""
    allowed = set(allowed)
    problems = []
    for reply in replies:
        where = f"reply {reply['message_id'][:12]} from node {reply['src_node_id']}"
        phase = reply["phase"]
        if phase not in PHASES:
            problems.append(f"{where}: message type {reply['message_type']!r} is no phase a "
                            "node may answer")
            continue
        for record, body in reply["records"].items():
            is_arrays = body["type"] == "ArrayRecord"
            if is_arrays != (record == "arrays"):
                problems.append(f"{where}: {phase}:{record} arrives as a {body['type']}")
            for key, value in body["fields"].items():
                field = f"{phase}:{record}.{key}"
                release = classify(phase, record, key)
                if release is None:
                    problems.append(f"{where}: {field} is not classified")
                    continue
                if release.protection is Protection.POLICY and release.policy not in allowed:
                    problems.append(f"{where}: {field} is a non-private release "
                                    f"({release.policy}) the node policy does not allow")
                if is_arrays and not dp and NON_PRIVATE_MODEL not in allowed:
                    problems.append(f"{where}: {field} is a model update without DP "
                                    f"({NON_PRIVATE_MODEL}) the node policy does not allow")
                if not is_arrays and not _scalars(value):
                    problems.append(f"{where}: {field} holds {type(value).__name__}, not "
                                    "scalars or a list of them")
    return problems


def strings_at_every_depth(value) -> list[str]:
    """Every string inside a field value, JSON-encoded strings (layouts, column lists) opened."""
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return [value]
        return [value] if isinstance(inner, str) else [value, *strings_at_every_depth(inner)]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*strings_at_every_depth(k),
                                                        *strings_at_every_depth(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings_at_every_depth(v)]
    return []
