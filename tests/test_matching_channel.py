"""The match channel over gRPC on loopback, and `fedpact match` between two nodes."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from files import write_csv
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.errors import ConfigurationError
from fedpact.federation.match_channel import FRAME_BYTES, TlsFiles, connect, listen
from fedpact.privacy.matching import MatchConfig, MatchParty, normalize_ids, run_match
from fedpact.service.cli_match import match_app


def _serve(transport, party, config, out):
    try:
        with transport:
            out["b"] = run_match(party, transport, config)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        out["b"] = exc


def test_grpc_channel_carries_large_messages_in_order():
    server = listen("127.0.0.1:0", timeout=30)
    payload = os.urandom(3 * FRAME_BYTES + 17)
    got = {}

    def responder():
        got["a"] = server.recv("big")
        got["empty"] = server.recv("empty")
        server.send("reply", payload[::-1])
        server.close()

    t = threading.Thread(target=responder)
    t.start()
    with connect(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.send("big", payload)
        client.send("empty", b"")
        assert client.recv("reply") == payload[::-1]
    t.join(30)
    assert got["a"] == payload and got["empty"] == b""


@pytest.mark.parametrize("mode", ["hash", "psi-cardinality"])
def test_match_over_grpc_equals_set_intersection(mode):
    a = normalize_ids([f"user{i}@example.com" for i in range(3000)], "email")
    b = normalize_ids([f"USER{i}@example.com " for i in range(2000, 6000)], "email")
    server = listen("127.0.0.1:0", timeout=60)
    out: dict = {}
    t = threading.Thread(target=_serve, args=(server, MatchParty("b", "crm_b", b),
                                              MatchConfig(mode), out))
    t.start()
    with connect(f"127.0.0.1:{server.port}", timeout=60) as client:
        ra = run_match(MatchParty("a", "crm_a", a), client, MatchConfig(mode))
    t.join(60)
    assert ra.overlap == out["b"].overlap == 1000
    assert ra.role == "initiator" and out["b"].role == "responder"


def test_unreachable_partner_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="no match partner reachable"):
        connect("127.0.0.1:1", connect_timeout=1)


def _self_signed(tmp_path: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return TlsFiles(tmp_path / "node.pem", tmp_path / "node.key", tmp_path / "node.pem")


def test_mutual_tls_channel(tmp_path):
    tls = _self_signed(tmp_path)
    a = normalize_ids(["a@x.com", "b@x.com"], "email")
    server = listen("localhost:0", tls=tls, timeout=30)
    out: dict = {}
    t = threading.Thread(target=_serve, args=(server, MatchParty("b", "crm_b", a),
                                              MatchConfig("psi", min_segment_size=1), out))
    t.start()
    with connect(f"localhost:{server.port}", tls=tls, timeout=30) as client:
        ra = run_match(MatchParty("a", "crm_a", a), client, MatchConfig("psi", min_segment_size=1))
    t.join(30)
    assert ra.overlap == out["b"].overlap == 2




def _grant(home: Path, subjects, purpose="audience_matching") -> None:
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        for sid in subjects:
            registry.grant(sid, purpose, channel="web", legal_basis="consent",
                           notice_version="v1", source="test")


def _withdraw(home: Path, subjects, purpose="audience_matching") -> None:
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        for sid in subjects:
            registry.withdraw(sid, purpose, channel="web", source="preference centre")


def _cli_match_against(theirs, args, *, reveal=True):
    """Run `fedpact match --connect` against an in-process partner holding `theirs`."""
    server = listen("127.0.0.1:0", timeout=60)
    out: dict = {}
    t = threading.Thread(target=_serve, args=(server, MatchParty("retailer", "pos", theirs),
                                              MatchConfig("psi", reveal_matches=reveal), out))
    t.start()
    result = CliRunner().invoke(match_app, ["--mode", "psi", "--connect",
                                            f"127.0.0.1:{server.port}", *args])
    t.join(60)
    assert result.exit_code == 0, (result.output, result.exception)
    return result, out["b"]


def test_cli_match_with_consent_segments_and_matched_rows(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["customer", "email", "band"],
                      [(f"c{i}", f"Person.{i}@GMAIL.com", "young" if i % 2 else "old")
                       for i in range(200)] + [("c-bad", "no email here", "old")])
    home = tmp_path / "home"
    _grant(home, [f"c{i}" for i in range(200)] + ["c-bad"])
    _withdraw(home, ["c150"])
    _withdraw(home, ["c8"], purpose="marketing")  # another purpose: c8 still takes part
    theirs = normalize_ids([f"person{i}@gmail.com" for i in range(100, 400)], "email")
    result, b = _cli_match_against(theirs, [
        "--ids", str(ours), "--column", "email", "--kind", "email",
        "--subject-column", "customer", "--segment-column", "band", "--party", "bank",
        "--matched-out", str(tmp_path / "matched.csv"), "--report-out", str(tmp_path / "r.json"),
        "--home", str(home), "--min-count", "5"])
    assert b.overlap == 99  # person100..199, less c150 who withdrew consent
    assert "overlap (exact, this node only)" in result.output
    matched = list(csv.DictReader((tmp_path / "matched.csv").read_text().splitlines()))
    assert {int(r["row"]) for r in matched} == set(range(100, 200)) - {150}
    assert sorted(r["token"] for r in matched) == sorted(b.tokens)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["overlap"] == b.overlap and {s["segment"] for s in report["segments"]} == {
        "old", "young"}
    with Ledger.open(home / "ledger.db") as ledger:
        events = ledger.events(event_type=EventType.MATCH_COMPLETED)
        excluded = ledger.events(event_type=EventType.DATA_EXCLUDED)
        used = ledger.events(event_type=EventType.SUBJECTS_USED)
    assert len(events) == 1 and events[0].payload["consent_excluded"] == 1
    assert events[0].payload["consent"] == {"enforced": True, "purpose": "audience_matching",
                                            "rows": 201, "excluded": 1}
    assert events[0].payload["normalization"]["pos"]["valid"] == 300
    job = events[0].job_id
    assert [(e.job_id, e.payload["excluded"], e.payload["total"]) for e in excluded] == [
        (job, 1, 201)]
    assert [(e.job_id, e.payload["subjects"]) for e in used] == [(job, 199)]  # c-bad invalid


def test_withdrawn_subjects_no_longer_match(tmp_path):
    """Match, withdraw consent for some subjects in the registry, match again: they are gone."""
    ours = write_csv(tmp_path / "ours.csv", ["customer_id", "email"],
                      [(f"cust-{i:03d}", f"shopper{i}@example.org") for i in range(120)])
    theirs = normalize_ids([f"SHOPPER{i}@example.org" for i in range(60, 200)], "email")
    home = tmp_path / "home"
    _grant(home, [f"cust-{i:03d}" for i in range(120)])
    args = ["--ids", str(ours), "--column", "email", "--kind", "email", "--subject-column",
            "customer_id", "--home", str(home), "--matched-out", str(tmp_path / "m.csv"),
            "--min-count", "1", "--json"]
    _, before = _cli_match_against(theirs, args)
    assert before.overlap == 60
    rows_before = {int(r["row"]) for r in csv.DictReader((tmp_path / "m.csv").read_text().splitlines())}
    assert rows_before == set(range(60, 120))

    withdrawn = [f"cust-{i:03d}" for i in (61, 70, 99, 119, 5)]  # 4 shared, 1 not shared
    _withdraw(home, withdrawn)
    _, after = _cli_match_against(theirs, args)
    assert after.overlap == 56
    rows_after = {int(r["row"]) for r in csv.DictReader((tmp_path / "m.csv").read_text().splitlines())}
    assert rows_after == rows_before - {61, 70, 99, 119}
    # nor does the partner see them matched (its rows i - 60 hold shopper i)
    assert set(before.matched_rows.tolist()) == set(range(60))
    assert set(after.matched_rows.tolist()) == set(range(60)) - {1, 10, 39, 59}
    with Ledger.open(home / "ledger.db") as ledger:
        events = ledger.events(event_type=EventType.MATCH_COMPLETED)
        excluded = ledger.events(event_type=EventType.DATA_EXCLUDED)
    assert [e.payload["consent_excluded"] for e in events] == [0, 5]
    assert [e.payload["excluded"] for e in excluded] == [0, 5]
    assert excluded[1].job_id == events[1].job_id != events[0].job_id


def test_cli_without_consent_names_the_registry(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [("a@x.com",), ("b@x.com",)])
    r = CliRunner().invoke(match_app, ["--mode", "psi", "--connect", "127.0.0.1:1", "--ids",
                                       str(ours), "--column", "email", "--home",
                                       str(tmp_path / "h")])
    assert isinstance(r.exception, ConfigurationError)
    assert "excluded by consent: 2" in str(r.exception) and "consent import" in str(r.exception)
    r = CliRunner().invoke(match_app, ["--mode", "psi", "--connect", "127.0.0.1:1", "--ids",
                                       str(ours), "--column", "email", "--consent-ledger",
                                       str(tmp_path / "nope.db")])
    assert isinstance(r.exception, ConfigurationError) and "nope.db" in str(r.exception)


def test_cli_errors_name_the_file_column_or_parameter(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["email"], [("a@x.com",)])
    runner = CliRunner()
    r = runner.invoke(match_app, ["--mode", "psi", "--listen", "127.0.0.1:0", "--connect",
                                  "127.0.0.1:1", "--ids", str(ours), "--column", "email"])
    assert isinstance(r.exception, ConfigurationError) and "--listen" in str(r.exception)
    r = runner.invoke(match_app, ["--mode", "psi", "--connect", "127.0.0.1:1", "--ids", str(ours),
                                  "--column", "mail"])
    assert isinstance(r.exception, ConfigurationError) and "'mail'" in str(r.exception)
    r = runner.invoke(match_app, ["--mode", "psx", "--connect", "127.0.0.1:1", "--ids", str(ours),
                                  "--column", "email"])
    assert isinstance(r.exception, ConfigurationError) and "psx" in str(r.exception)
    r = runner.invoke(match_app, ["--mode", "psi", "--connect", "127.0.0.1:1", "--ids", str(ours),
                                  "--column", "email", "--subject-column", "customer"])
    assert isinstance(r.exception, ConfigurationError) and "'customer'" in str(r.exception)
    r = runner.invoke(match_app, ["--mode", "psi-cardinality", "--connect", "127.0.0.1:1",
                                  "--ids", str(ours), "--column", "email",
                                  "--matched-out", str(tmp_path / "m.csv")])
    assert isinstance(r.exception, ConfigurationError) and "psi-cardinality" in str(r.exception)


def test_cli_between_two_processes(tmp_path):
    """`fedpact match --listen` and `--connect` as two separate processes over loopback."""
    a = write_csv(tmp_path / "a.csv", ["phone"], [(f"020 7946 {i:04d}",) for i in range(300)])
    b = write_csv(tmp_path / "b.csv", ["tel"], [(f"+44 20 7946 {i:04d}",) for i in range(200, 500)])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "from fedpact.service.cli_match import match_app; match_app()"
    env = {**os.environ, "COLUMNS": "200"}
    common = ["--mode", "psi-cardinality", "--kind", "phone", "--default-region", "GB",
              "--json", "--min-count", "1", "--no-require-consent"]
    listener = subprocess.Popen(
        [sys.executable, "-c", code, *common, "--listen", f"127.0.0.1:{port}", "--ids", str(b),
         "--column", "tel", "--home", str(tmp_path / "hb"), "--timeout", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        connector = subprocess.run(
            [sys.executable, "-c", code, *common, "--connect", f"127.0.0.1:{port}", "--ids",
             str(a), "--column", "phone", "--home", str(tmp_path / "ha"), "--timeout", "240"],
            capture_output=True, text=True, env=env, timeout=300)
        out_b, err_b = listener.communicate(timeout=300)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert connector.returncode == 0, connector.stderr
    assert listener.returncode == 0, err_b
    report_a = json.loads(connector.stdout[connector.stdout.index("{"):])
    report_b = json.loads(out_b[out_b.index("{"):])
    assert report_a["overlap"] == report_b["overlap"] == 100
    with Ledger.open(tmp_path / "ha" / "ledger.db") as ledger:
        (event,) = ledger.events(event_type=EventType.MATCH_COMPLETED)
    assert event.payload["consent"]["enforced"] is False  # opting out is on the record
