"""Hardening of audience matching: segment policy, noise scale, budgets, outputs, audit, timeouts."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time

import numpy as np
import pytest
from files import write_csv
from test_matching_protocol import run_pair, synthetic_sets
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.errors import ConfigurationError, FedpactError
from fedpact.federation.match_channel import connect
from fedpact.privacy.budget import BudgetError, PrivacyBudgets
from fedpact.privacy.matching import (
    LocalTransport,
    MatchConfig,
    MatchMode,
    MatchParty,
    MatchProtocolError,
    MatchResult,
    build_overlap_report,
    normalize_ids,
    record_match,
    run_match,
)
from fedpact.privacy.matching.protocol import PROTOCOL, check_segments
from fedpact.privacy.matching.report import budget_check, report_sensitivity
from fedpact.service import cli_match
from fedpact.service.cli_match import match_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kinds(transport) -> list[str]:
    return [kind for kind, _ in transport.recorder.sent]


# --------------------------------------------------------------------------- 1. segment policy


def _dishonest_hello(n: int, group_sizes: list[int]) -> dict:
    """The hello of a partner that puts every identifier in its own segment and asks for k=1."""
    return {
        "protocol": PROTOCOL, "mode": "psi-cardinality", "purpose": "audience_matching",
        "group": "x25519", "party": "mallory", "dataset": "crm_m", "reveal_matches": False,
        "unique_ids": n, "normalization": {"rows": n}, "group_sizes": group_sizes,
        "report_epsilon": None, "segment_policy": {"min_size": 1, "max_segments": 10**9},
        "nonce": secrets.token_hex(32),
    }


def _honest_side_against(hello: dict) -> tuple[object, LocalTransport]:
    """Run an honest responder against a partner that sends `hello`; return its outcome."""
    ta, tb = LocalTransport.pair(record=True, timeout=30)
    ids = normalize_ids([f"user{i}@example.com" for i in range(200)], "email")
    out: dict = {}

    def honest():
        try:
            out["b"] = run_match(MatchParty("beta", "crm_b", ids), tb, MatchConfig("psi-cardinality"))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["b"] = exc

    t = threading.Thread(target=honest)
    t.start()
    ta.send("hello", json.dumps(hello).encode())
    ta.recv("hello")
    with pytest.raises(MatchProtocolError, match="stopped the match job"):
        ta.recv("encrypted")  # the honest side aborts instead of sending anything else
    t.join(30)
    return out["b"], tb


def test_one_row_per_segment_is_refused_by_the_honest_partner():
    n = 50
    outcome, tb = _honest_side_against(_dishonest_hello(n, [1] * n))
    assert isinstance(outcome, ConfigurationError)
    assert "--min-count" in str(outcome) and "k=10" in str(outcome)
    assert _kinds(tb) == ["hello", "abort"]  # nothing derived from an identifier went out


def test_too_many_segment_groups_are_refused_by_the_honest_partner():
    outcome, tb = _honest_side_against(_dishonest_hello(65 * 10, [10] * 65))
    assert isinstance(outcome, ConfigurationError)
    assert "--max-segments" in str(outcome) and "max_segments=64" in str(outcome)
    assert _kinds(tb) == ["hello", "abort"]


def test_own_small_segments_are_refused_before_sending():
    raw_a, raw_b = synthetic_sets(60, 60, 30, seed=4)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    per_row = [f"cust-{i}" for i in range(60)]  # --segment-column customer_id
    with pytest.raises(ConfigurationError, match="--min-count"):
        check_segments(MatchParty("alpha", "crm_a", a, per_row), MatchConfig("psi-cardinality"))
    ra, rb, ta, _ = run_pair(a, b, "psi-cardinality", segments_a=per_row, record=True)
    assert isinstance(ra, ConfigurationError) and "k=10" in str(ra)
    assert "cust-" not in str(ra)  # the reason goes to the partner: it names no segment
    assert _kinds(ta) == ["abort"]  # not even the hello
    assert isinstance(rb, MatchProtocolError) and "--min-count" in str(rb)


def test_stricter_segment_policy_of_the_two_binds_both():
    raw_a, raw_b = synthetic_sets(60, 60, 30, seed=4)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    bands = ["young" if i % 2 else "old" for i in range(60)]  # two segments of 30
    ra, rb, _, _ = run_pair(a, b, "psi-cardinality", segments_a=bands,
                            config_b=MatchConfig("psi-cardinality", min_segment_size=50))
    assert isinstance(ra, ConfigurationError) and "k=50 agreed with the partner" in str(ra)
    assert isinstance(rb, ConfigurationError) and "fewer than k=50" in str(rb)
    ra, rb, _, _ = run_pair(a, b, "psi-cardinality", segments_a=bands)  # k=10 on both: fine
    assert ra.overlap == rb.overlap == 30
    truth = {v: 0 for v in ("old", "young")}
    shared = set(raw_b)
    for i, raw in enumerate(raw_a):
        truth[bands[i]] += raw in shared
    assert ra.segment_overlap == truth


def test_cli_refuses_a_segment_per_customer_before_connecting(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["customer_id", "email"],
                      [(f"c{i}", f"p{i}@example.org") for i in range(40)])
    start = time.monotonic()
    r = CliRunner().invoke(match_app, [
        "--mode", "psi-cardinality", "--connect", "127.0.0.1:1", "--connect-timeout", "60",
        "--ids", str(ours), "--column", "email", "--segment-column", "customer_id",
        "--no-require-consent", "--home", str(tmp_path / "h")])
    assert isinstance(r.exception, ConfigurationError) and "--min-count" in str(r.exception)
    assert time.monotonic() - start < 20  # refused before dialling
    with Ledger.open(tmp_path / "h" / "ledger.db") as ledger:
        assert ledger.events(event_type=EventType.MATCH_STARTED) == []


# --------------------------------------------------------------------------- 2. noise scale


def _result(**over) -> MatchResult:
    base = dict(job_id="match-test", mode=MatchMode.PSI_CARDINALITY, group="x25519",
                role="initiator", purpose="audience_matching", party="alpha", dataset="crm_a",
                peer_party="beta", peer_dataset="crm_b", own_size=50_000, peer_size=80_000,
                overlap=20_000, own_normalization={}, peer_normalization={},
                segment_sizes={"a": 20_000, "b": 30_000},
                segment_overlap={"a": 9_000, "b": 11_000})
    base.update(over)
    return MatchResult(**base)


def _released(result: MatchResult) -> np.ndarray:
    """The exact counts a report releases, in a fixed order."""
    names = sorted(result.segment_sizes or {})
    values = [result.own_size, result.peer_size, result.overlap]
    values += [result.segment_sizes[n] for n in names] if result.segment_sizes else []
    values += [result.segment_overlap[n] for n in names] if result.segment_overlap else []
    return np.asarray(values, dtype=np.int64)


def test_noise_scale_is_sensitivity_over_epsilon():
    assert report_sensitivity(segment_sizes=False, segment_overlaps=False) == 2
    assert report_sensitivity(segment_sizes=True, segment_overlaps=False) == 3
    assert report_sensitivity(segment_sizes=True, segment_overlaps=True) == 4
    with_segments = build_overlap_report(_result(), epsilon=0.5)
    assert (with_segments.sensitivity, with_segments.noise_scale) == (4, 8.0)
    totals_only = build_overlap_report(_result(segment_sizes=None, segment_overlap=None),
                                       epsilon=0.5)
    assert (totals_only.sensitivity, totals_only.noise_scale) == (2, 4.0)
    assert build_overlap_report(_result()).noise_scale is None


@pytest.mark.parametrize("segments", [True, False])
def test_empirical_noise_variance_matches_the_sensitivity(segments):
    eps = 1.0
    result = _result() if segments else _result(segment_sizes=None, segment_overlap=None)
    rng = np.random.default_rng(2024)
    noise = np.array([build_overlap_report(result, epsilon=eps, rng=rng).own_size - 50_000
                      for _ in range(4000)])
    delta = 4 if segments else 2
    a = np.exp(-eps / delta)  # discrete Laplace of scale Δ/ε: Var = 2a / (1 - a)^2
    assert noise.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.12)


def test_sensitivity_bounds_neighbouring_match_jobs():
    """One identifier more on either side changes the released counts by at most Δ in L1."""
    raw_a, raw_b = synthetic_sets(60, 60, 30, seed=8)
    bands = ["x" if i % 3 else "y" for i in range(61)]
    newcomer = "shared.newcomer@example.org"

    def released(a_rows, b_rows):
        a, b = normalize_ids(a_rows, "email"), normalize_ids(b_rows, "email")
        ra, _, _, _ = run_pair(a, b, "psi-cardinality", segments_a=bands[:len(a_rows)])
        assert not isinstance(ra, Exception), ra
        return _released(ra)

    base = released(raw_a, raw_b + [newcomer])
    own_added = released(raw_a + [newcomer], raw_b + [newcomer])
    peer_removed = released(raw_a + [newcomer], raw_b)
    delta = report_sensitivity(segment_sizes=True, segment_overlaps=True)
    assert np.abs(own_added - base).sum() == delta  # the bound is reached: not too loose either
    assert np.abs(own_added - peer_removed).sum() <= delta


# --------------------------------------------------------------------------- 3. budget


def test_epsilon_over_budget_is_refused_and_nothing_is_charged(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    home = tmp_path / "h"
    with Ledger.open(home / "ledger.db") as ledger:
        PrivacyBudgets(ledger).set("ours.csv", 0.5, 1e-6, actor="owner")
    start = time.monotonic()
    r = CliRunner().invoke(match_app, [
        "--mode", "psi-cardinality", "--connect", "127.0.0.1:1", "--connect-timeout", "60",
        "--ids", str(ours), "--column", "email", "--no-require-consent", "--epsilon", "1",
        "--home", str(home)])
    assert isinstance(r.exception, BudgetError) and isinstance(r.exception, FedpactError)
    assert "ε=1.000" in str(r.exception) and "0.500" in str(r.exception)
    assert time.monotonic() - start < 20  # refused before dialling
    with Ledger.open(home / "ledger.db") as ledger:
        assert ledger.events(event_type=EventType.PRIVACY_SPENT) == []
        assert ledger.events(event_type=EventType.MATCH_STARTED) == []
        assert PrivacyBudgets(ledger).get("ours.csv").epsilon_spent == 0


def test_partner_announced_epsilon_is_checked_after_the_handshake(tmp_path):
    raw_a, raw_b = synthetic_sets(40, 40, 20, seed=3)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    with Ledger.open(tmp_path / "a.db") as la, Ledger.open(tmp_path / "b.db") as lb:
        PrivacyBudgets(la).set("crm_a", 1.0, 1e-6, actor="owner")
        PrivacyBudgets(lb).set("crm_b", 5.0, 1e-6, actor="owner")

        def job(eps_a, eps_b):
            ta, tb = LocalTransport.pair(record=True, timeout=30)
            out: dict = {}

            def side(key, party, transport, config, ledger, dataset, eps):
                try:
                    out[key] = run_match(party, transport, config,
                                         budget_check=budget_check(ledger, dataset,
                                                                   own_epsilon=eps))
                except Exception as exc:  # noqa: BLE001 - handed to the test
                    out[key] = exc

            args = [("a", MatchParty("alpha", "crm_a", a), ta,
                     MatchConfig("psi-cardinality", report_epsilon=eps_a), la, "crm_a", eps_a),
                    ("b", MatchParty("beta", "crm_b", b), tb,
                     MatchConfig("psi-cardinality", report_epsilon=eps_b), lb, "crm_b", eps_b)]
            threads = [threading.Thread(target=side, args=x) for x in args]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            return out["a"], out["b"], ta

        # 0.6 for alpha's own report fits its budget of 1; with beta's announced 0.6 it does not
        ra, rb, ta = job(0.6, 0.6)
        assert isinstance(ra, BudgetError) and "partner announced" in str(ra)
        assert isinstance(rb, MatchProtocolError) and "privacy budget" in str(rb)
        assert "1.0" not in str(rb) and "0.6" not in str(rb)  # alpha's figures stay on alpha
        assert _kinds(ta) == ["hello", "abort"]
        assert la.events(event_type=EventType.PRIVACY_SPENT) == []
        assert lb.events(event_type=EventType.PRIVACY_SPENT) == []

        ra, rb, _ = job(0.5, 0.25)  # 0.75 fits
        assert ra.overlap == rb.overlap == 20
        record_match(la, ra, build_overlap_report(ra, epsilon=0.5))
        record_match(lb, rb, build_overlap_report(rb, epsilon=0.25))
        # each side charges only its own dataset, for both reports computed from it
        assert PrivacyBudgets(la).get("crm_a").epsilon_spent == pytest.approx(0.75)
        assert PrivacyBudgets(lb).get("crm_b").epsilon_spent == pytest.approx(0.75)
        for ledger, own in ((la, "crm_a"), (lb, "crm_b")):
            assert {e.payload["dataset"] for e in
                    ledger.events(event_type=EventType.PRIVACY_SPENT)} == {own}


def test_epsilon_without_a_budget_is_refused(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    r = CliRunner().invoke(match_app, [
        "--mode", "psi", "--connect", "127.0.0.1:1", "--ids", str(ours), "--column", "email",
        "--no-require-consent", "--epsilon", "0.1", "--home", str(tmp_path / "h")])
    assert isinstance(r.exception, BudgetError) and "set-budget" in str(r.exception)


# --------------------------------------------------------------------------- 4. output paths


@pytest.mark.parametrize("option", ["--report-out", "--matched-out"])
def test_unwritable_output_paths_are_refused_before_connecting(tmp_path, option):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    (tmp_path / "a-file").write_text("x")
    for bad, why in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "out.csv", "cannot be written")):
        start = time.monotonic()
        r = CliRunner().invoke(match_app, [
            "--mode", "psi", "--connect", "127.0.0.1:1", "--connect-timeout", "60",
            "--ids", str(ours), "--column", "email", "--no-require-consent",
            "--home", str(tmp_path / "h"), option, str(bad)])
        assert isinstance(r.exception, ConfigurationError), r.exception
        assert option in str(r.exception) and why in str(r.exception)
        assert time.monotonic() - start < 20
    assert not (tmp_path / "h" / "ledger.db").exists()  # refused before the ledger was opened


# --------------------------------------------------------------------------- 5. audit of failures


def test_mode_mismatch_leaves_started_and_failed_records_on_both_sides(tmp_path):
    ours = write_csv(tmp_path / "a.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    theirs = write_csv(tmp_path / "b.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    port = _free_port()
    out: dict = {}

    def listener():
        try:
            cli_match.match(mode="hash", ids=theirs, column="email", listen=f"127.0.0.1:{port}",
                            party="retailer", require_consent=False,
                            home=str(tmp_path / "hb"), timeout=30)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["b"] = exc

    t = threading.Thread(target=listener)
    t.start()
    with pytest.raises(ConfigurationError, match="--mode"):
        cli_match.match(mode="psi", ids=ours, column="email", connect=f"127.0.0.1:{port}",
                        party="bank", require_consent=False, home=str(tmp_path / "ha"),
                        timeout=30, connect_timeout=30)
    t.join(60)
    assert isinstance(out.get("b"), ConfigurationError) and "--mode" in str(out["b"])
    for home, party, dataset, mode, role in (("ha", "bank", "a.csv", "psi", "initiator"),
                                             ("hb", "retailer", "b.csv", "hash", "responder")):
        with Ledger.open(tmp_path / home / "ledger.db") as ledger:
            events = ledger.events()
            assert ledger.verify().ok
        kinds = [e.event_type for e in events]
        assert kinds == [EventType.MATCH_STARTED.value, EventType.JOB_FAILED.value], kinds
        started, failed = events
        assert started.job_id == failed.job_id and started.job_id.startswith("match-attempt-")
        assert started.payload["datasets"] == [dataset] and started.payload["mode"] == mode
        assert started.payload["party"] == party and started.payload["role"] == role
        assert started.payload["purpose"] == "audience_matching"
        assert failed.payload["kind"] == "match" and failed.payload["stage"] == "exchange"
        assert failed.payload["datasets"] == [dataset] and failed.payload["party"] == party
        assert "--mode" in failed.payload["reason"] and failed.payload["epsilon_charged"] == 0
        assert failed.actor == f"node:{party}"


def test_completed_job_links_back_to_its_start(tmp_path):
    ours = write_csv(tmp_path / "a.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    theirs = normalize_ids([f"p{i}@example.org" for i in range(10, 40)], "email")
    port = _free_port()
    out: dict = {}

    def partner():
        try:
            with connect(f"127.0.0.1:{port}", timeout=60, connect_timeout=60) as channel:
                out["b"] = run_match(MatchParty("retailer", "pos", theirs), channel,
                                     MatchConfig("psi-cardinality"))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["b"] = exc

    t = threading.Thread(target=partner)
    t.start()
    r = CliRunner().invoke(match_app, [
        "--mode", "psi-cardinality", "--listen", f"127.0.0.1:{port}", "--ids", str(ours),
        "--column", "email", "--no-require-consent", "--min-count", "1", "--json",
        "--timeout", "60", "--home", str(tmp_path / "h")])
    t.join(60)
    assert r.exit_code == 0, (r.output, r.exception)
    # 7. with --json stdout is pure JSON; progress went to stderr
    report = json.loads(r.stdout)
    assert report["overlap"] == out["b"].overlap == 20
    assert "waiting for the partner" in r.stderr and "waiting" not in r.stdout
    with Ledger.open(tmp_path / "h" / "ledger.db") as ledger:
        (started,) = ledger.events(event_type=EventType.MATCH_STARTED)
        (done,) = ledger.events(event_type=EventType.MATCH_COMPLETED)
        assert ledger.events(event_type=EventType.JOB_FAILED) == []
    assert done.payload["attempt"] == started.job_id and done.job_id == out["b"].job_id


# --------------------------------------------------------------------------- 6. connect timeout


def test_short_connect_timeout_against_a_closed_port(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [(f"p{i}@example.org",) for i in range(30)])
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    r = CliRunner().invoke(match_app, [
        "--mode", "psi", "--connect", f"127.0.0.1:{port}", "--connect-timeout", "1.5",
        "--timeout", "2", "--ids", str(ours), "--column", "email", "--no-require-consent",
        "--home", str(tmp_path / "h")])
    elapsed = time.monotonic() - start
    assert isinstance(r.exception, ConfigurationError)
    assert "no match partner reachable" in str(r.exception) and "1.5 s" in str(r.exception)
    assert elapsed < 10, elapsed
    with Ledger.open(tmp_path / "h" / "ledger.db") as ledger:
        (failed,) = ledger.events(event_type=EventType.JOB_FAILED)
    assert failed.payload["stage"] == "connect"
    r = CliRunner().invoke(match_app, [
        "--mode", "psi", "--connect", f"127.0.0.1:{port}", "--connect-timeout", "0",
        "--ids", str(ours), "--column", "email", "--no-require-consent",
        "--home", str(tmp_path / "h")])
    assert isinstance(r.exception, ConfigurationError) and "--connect-timeout" in str(r.exception)


def test_a_partner_set_smaller_than_k_is_refused_like_a_small_segment():
    """One unsegmented identifier is a segment of one: its overlap (0 or 1) would say whether
    that person is among our customers."""
    outcome, tb = _honest_side_against(_dishonest_hello(1, [1]))
    assert isinstance(outcome, ConfigurationError)
    assert "the partner offers 1 distinct identifiers" in str(outcome) and "k=10" in str(outcome)
    assert _kinds(tb) == ["hello", "abort"]


def test_own_set_smaller_than_k_is_refused_before_sending():
    few = normalize_ids([f"user{i}@example.com" for i in range(3)], "email")
    with pytest.raises(ConfigurationError, match="this node offers 3 distinct identifiers"):
        check_segments(MatchParty("alpha", "crm_a", few), MatchConfig("psi-cardinality"))
    check_segments(MatchParty("alpha", "crm_a", few), MatchConfig("hash"))  # hash mode: no k
