"""A consortium of accounts for tests, demos and load runs: one person per role, tokens issued.

`seed_consortium(service, partners)` creates a data scientist, a compliance officer, one partner
admin per partner dataset, one node identity per partner, and an "all-roles" person (data
scientist + compliance officer + every partner's admin) for API fuzzing; it returns their tokens
and TOTP secrets. `register_builtin_datasets` registers a built-in split's partner datasets in the
dataset registry. `Clock` is a settable clock for the service (token expiry, idle sessions).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import CoordinatorService

PASSWORD = "correct horse battery staple"


class Clock:
    """Wall time plus an offset that tests advance."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Member:
    username: str
    token: str
    totp_secret: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Consortium:
    scientist: Member
    compliance: Member
    admins: dict[str, Member]  # partner dataset -> its admin
    nodes: dict[str, Member]  # partner dataset -> its node identity
    everyone: Member  # all person roles, every partner's admin
    partners: list[str] = field(default_factory=list)


def handle(partner: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", partner.split("/")[-1].lower())[:40]


def seed_consortium(service: CoordinatorService, partners: list[str], *, password: str = PASSWORD,
                    token_days: float = 30) -> Consortium:
    acc = service.accounts

    def person(name: str, *grants: tuple[str, str]) -> Member:
        account = acc.create_user(name, password=password, created_by="operator:test")
        for role, scope in grants:
            acc.grant(name, role, scope, granted_by="operator:test")
        token = acc.issue_token(name, days=token_days, issued_by="operator:test").token
        return Member(name, token, account.totp_secret)

    def machine(name: str, scope: str) -> Member:
        acc.create_user(name, kind="machine", created_by="operator:test")
        acc.grant(name, "node", scope, granted_by="operator:test")
        return Member(name, acc.issue_token(name, days=token_days, issued_by="operator:test").token)

    scientist = person("dana", ("data_scientist", ""))
    compliance = person("carl", ("compliance_officer", ""))
    admins = {p: person(f"admin-{handle(p)}", ("partner_admin", p)) for p in partners}
    nodes = {p: machine(f"node-{handle(p)}", p) for p in partners}
    everyone = person("root-of-all", ("data_scientist", ""), ("compliance_officer", ""),
                      *[("partner_admin", p) for p in partners])
    return Consortium(scientist, compliance, admins, nodes, everyone, list(partners))


def register_builtin_datasets(service: CoordinatorService, dataset: str = "telco",
                              partitioning: str = "segment", partners: int = 3) -> list[str]:
    """Register a built-in data set's split partners as ordinary partner datasets (group: the data
    set's name, e.g. telco-churn), as their admins would; return their names."""
    from .datasets import register_builtin_partners

    return [e.name for e in register_builtin_partners(service.datasets, dataset, partitioning,
                                                       partners)]


def write_mapping(spec, path, *, name: str = "acme-telco", categories: dict | None = None):
    """A TOML mapping file (docs/data.md) describing `spec`'s columns, declared categories included;
    `categories` replaces some columns' declared values (to make a layout that differs)."""
    from pathlib import Path

    from fedpact.models.datasets import render_mapping

    path = Path(path)
    path.write_text(render_mapping(spec, name=name, categories=categories))
    return path


def approve_and_wait(client, service: CoordinatorService, people: Consortium, job_id: str,
                     partners: list[str], *, timeout: float = 300) -> None:
    """Every partner's admin approves `job_id`; wait until the runner has finished with it."""
    for partner in partners:
        r = client.post(f"/api/v1/jobs/{job_id}/approve", json={"partner": partner},
                        headers=people.admins[partner].headers)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (service.board.get(job_id).status not in ("queued", "running", "approved")
                and service.runner.idle()):
            return
        time.sleep(0.5)
