"""What a match job discloses beyond its report (issue #13, items 4 and 5).

1. PSI with segments: a curious party that keeps every message it sent and received, and its own
   secret scalars, tries to compute the exact cross-tabulation own segment × partner segment
   (e.g. how many of its "vip" customers are in the partner's "high-risk" segment). It must not
   get it: it learns only the overlap per own segment.
2. Hash mode with low-entropy identifiers (phone numbers): refused unless the risk is accepted,
   and then stated in the report, its JSON and the ledger; an enumeration attack shows why.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from files import write_csv
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.errors import ConfigurationError
from fedpact.federation.match_channel import listen
from fedpact.privacy.matching import (
    LocalTransport,
    MatchConfig,
    MatchParty,
    build_overlap_report,
    group_named,
    normalize_ids,
    record_match,
    run_match,
)
from fedpact.privacy.matching import protocol as protocol_module
from fedpact.privacy.matching.groups import ELEMENT_BYTES, SecretScalar
from fedpact.privacy.matching.keyed_hash import TOKEN_BYTES, hmac_tokens
from fedpact.privacy.matching.normalize import enumeration_risk
from fedpact.service import cli_match
from fedpact.service.cli_match import match_app

# --------------------------------------------------------------------------- 1. PSI cross-tab


def _segmented_sets():
    """A: 20 'vip' (all shared, all in B's 'high-risk') and 80 'regular' (30 shared: 10 in
    'high-risk', 20 in 'low-risk'). B: 60 'high-risk', 80 'low-risk'. Sizes differ (100, 140)
    so that the attacker can tell which side's block structure a message could carry."""
    vip = [f"vip{i}@example.org" for i in range(20)]
    reg_high = [f"reg-hi{i}@example.org" for i in range(10)]
    reg_low = [f"reg-lo{i}@example.org" for i in range(20)]
    reg_only = [f"reg-only{i}@example.org" for i in range(50)]
    b_high_only = [f"b-hi{i}@example.org" for i in range(30)]
    b_low_only = [f"b-lo{i}@example.org" for i in range(60)]
    a_ids = vip + reg_high + reg_low + reg_only
    a_seg = ["vip"] * 20 + ["regular"] * 80
    b_ids = vip + reg_high + b_high_only + reg_low + b_low_only
    b_seg = ["high-risk"] * (20 + 10 + 30) + ["low-risk"] * (20 + 60)
    truth = {("regular", "high-risk"): 10, ("regular", "low-risk"): 20,
             ("vip", "high-risk"): 20, ("vip", "low-risk"): 0}
    return a_ids, a_seg, b_ids, b_seg, truth


class _KeepScalars:
    """Wraps the group so that the curious party's thread keeps copies of its secret scalars
    (an honest-but-curious party keeps its whole state; the protocol erases them)."""

    def __init__(self, inner, thread_name: str, kept: list[bytes]):
        self._inner, self._thread, self._kept = inner, thread_name, kept

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def new_scalar(self):
        scalar = self._inner.new_scalar()
        if threading.current_thread().name == self._thread:
            self._kept.append(ctypes.string_at(scalar.address, scalar.size))
        return scalar


def _scalar_from(raw: bytes) -> SecretScalar:
    s = SecretScalar(len(raw))
    ctypes.memmove(s.address, raw, len(raw))
    return s


def _run_curious_pair(monkeypatch, a_ids, a_seg, b_ids, b_seg, mode="psi-cardinality",
                      reveal=False):
    kept: list[bytes] = []
    real = protocol_module.group_named
    monkeypatch.setattr(protocol_module, "group_named",
                        lambda name: _KeepScalars(real(name), "curious", kept))
    ta, tb = LocalTransport.pair(record=True, timeout=120)
    a = MatchParty("alpha", "crm_a", normalize_ids(a_ids, "email"), a_seg)
    b = MatchParty("beta", "crm_b", normalize_ids(b_ids, "email"), b_seg)
    out: dict = {}

    def side(key, party, transport):
        try:
            out[key] = run_match(party, transport, MatchConfig(mode, reveal_matches=reveal))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out[key] = exc

    threads = [threading.Thread(target=side, args=("a", a, ta), name="curious"),
               threading.Thread(target=side, args=("b", b, tb), name="honest")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not isinstance(out["a"], Exception), out["a"]
    assert not isinstance(out["b"], Exception), out["b"]
    return out["a"], out["b"], ta, a, kept


def _blocks(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def _attack(transport, party: MatchParty, kept: list[bytes], group_name="x25519"):
    """Every cross-tabulation the curious side can build from its view.

    Its view: each message it sent or received, its identifiers and segments, and its scalars.
    It derives every value it can (each message of group elements and its own hashed
    identifiers, times every product of up to two of its scalars), then joins every pair of
    them. A value derived from its own identifiers carries its own segment exactly; a value in
    a message of n_own (n_peer) elements is attributed to a segment by position, in the blocks
    of the sizes its own (the partner's) hello announced, in sorted order of the segment names.
    Returns one candidate table {(own segment, partner block): count} per joined pair.
    """
    group = group_named(group_name)
    sent, received = transport.recorder.sent, transport.recorder.received
    own_hello = json.loads(dict(sent)["hello"])
    peer_hello = json.loads(dict(received)["hello"])
    own_sizes, peer_sizes = own_hello["group_sizes"], peer_hello["group_sizes"]
    n_own, n_peer = sum(own_sizes), sum(peer_sizes)
    own_names = sorted(set(party.segments))
    unique = party.ids.unique()
    first_row = {}
    for row, value in zip(party.ids.rows.tolist(), party.ids.values, strict=True):
        first_row.setdefault(value, row)
    own_label = np.array([own_names.index(party.segments[first_row[v]]) for v in unique])
    init, resp = ((own_hello, peer_hello) if transport.role == "initiator"
                  else (peer_hello, own_hello))
    job_id = protocol_module._job_id(bytes.fromhex(init["nonce"]), bytes.fromhex(resp["nonce"]))

    # (records, per-element own label or None, per-element partner block or None)
    sources = []
    hashed = group.hash_to_group([u.encode() for u in unique], job_id.encode())
    sources.append(("own H(x)", bytes(hashed), own_label, None))
    for direction, messages in (("sent", sent), ("received", received)):
        for kind, payload in messages:
            if kind == "hello" or len(payload) % ELEMENT_BYTES or not payload:
                continue
            n = len(payload) // ELEMENT_BYTES
            own = _blocks(own_sizes) if n == n_own else None
            peer = _blocks(peer_sizes) if n == n_peer else None
            if own is None and peer is None:
                continue
            sources.append((f"{direction} {kind}", payload, own, peer))
    scalars = [_scalar_from(raw) for raw in kept]
    products = [[]] + [[s] for s in scalars] + [[s, t] for i, s in enumerate(scalars)
                                                for t in scalars[i:]]
    derived = []
    for name, payload, own, peer in sources:
        for chain in products:
            values = bytes(payload)
            for s in chain:
                values = bytes(group.multiply(s, values))
            records = np.frombuffer(values, dtype=np.uint8).reshape(-1, ELEMENT_BYTES)
            derived.append((f"{name} ×{len(chain)}", [r.tobytes() for r in records], own, peer))
    candidates = []
    for xi, (x_name, x_rec, x_own, _) in enumerate(derived):
        if x_own is None:
            continue
        where = {r: i for i, r in enumerate(x_rec)}
        for yi, (y_name, y_rec, _, y_peer) in enumerate(derived):
            if y_peer is None or xi == yi or x_name.split(" ×")[0] == y_name.split(" ×")[0]:
                continue
            table = Counter()
            for j, r in enumerate(y_rec):
                i = where.get(r)
                if i is not None:
                    table[(int(x_own[i]), int(y_peer[j]))] += 1
            if table:
                candidates.append((x_name, y_name, table))
    return candidates, own_names


def _as_blocks(truth, own_names, peer_names):
    return Counter({(own_names.index(o), peer_names.index(p)): c
                    for (o, p), c in truth.items() if c})


def test_curious_psi_party_cannot_rebuild_the_cross_tabulation(monkeypatch):
    a_ids, a_seg, b_ids, b_seg, truth = _segmented_sets()
    ra, rb, ta, party_a, kept = _run_curious_pair(monkeypatch, a_ids, a_seg, b_ids, b_seg)
    # What the report defines still comes out, exactly, on each side: per own segment.
    assert ra.overlap == rb.overlap == 50
    assert ra.segment_overlap == {"regular": 30, "vip": 20}
    assert rb.segment_overlap == {"high-risk": 30, "low-risk": 20}
    candidates, own_names = _attack(ta, party_a, kept)
    # The attack is not blind: it does find the matches, with their own segments...
    per_own = {own_names.index(s): c for s, c in ra.segment_overlap.items()}
    assert any({o: sum(c for (oo, _), c in table.items() if oo == o) for o in per_own} == per_own
               for _, _, table in candidates)
    # ... but not how they fall into the partner's segments.
    target = _as_blocks(truth, own_names, sorted(set(b_seg)))
    hits = [(x, y) for x, y, table in candidates if table == target]
    assert not hits, f"the curious side rebuilt the exact cross-tabulation from {hits[0]}"
    # Nor does any pair show the partner's segments as a grouping of the matches: wherever the
    # 20 'vip' matches meet a value attributed to a partner block, they are spread over blocks.
    vip = own_names.index("vip")
    for x, y, table in candidates:
        vip_cells = {blk: c for (o, blk), c in table.items() if o == vip}
        if sum(vip_cells.values()) == 20:
            assert len(vip_cells) > 1, f"all 20 vip matches fall in one partner block: {x} / {y}"


def test_curious_party_without_segments_cannot_learn_the_partners_segment_overlaps(monkeypatch):
    """A side without segments against a segmented partner: the partner's grouped encoding
    reaches it, but nothing it joins carries the grouping, so it cannot tell that every shared
    customer is in the partner's 'high-risk' segment."""
    shared = [f"s{i}@example.org" for i in range(50)]
    a_ids = shared + [f"a{i}@example.org" for i in range(50)]
    b_ids = shared + [f"hi{i}@example.org" for i in range(10)] + [
        f"lo{i}@example.org" for i in range(80)]
    b_seg = ["high-risk"] * 60 + ["low-risk"] * 80
    ra, rb, ta, party_a, kept = _run_curious_pair(monkeypatch, a_ids, ["all"] * 100, b_ids,
                                                  b_seg)
    assert ra.overlap == 50 and ra.segment_overlap == {"all": 50}
    assert rb.segment_overlap == {"high-risk": 50, "low-risk": 0}
    candidates, _ = _attack(ta, party_a, kept)
    assert any(sum(table.values()) == 50 for _, _, table in candidates)  # it finds the matches
    for x, y, table in candidates:  # ... never all 50 in one partner block
        assert max(table.values()) < 50, f"the partner's segment overlap shows in {x} / {y}"
    assert "encrypted-grouped" in [k for k, _ in ta.recorder.received]
    assert "encrypted-grouped" not in [k for k, _ in ta.recorder.sent]  # one group: not needed


@pytest.mark.parametrize("segmented,mode,group", [
    ("a", "psi-cardinality", "x25519"), ("b", "psi", "x25519"),
    ("both", "psi-cardinality", "ristretto255"), ("both", "psi", "x25519")])
def test_segment_counts_stay_exact_whoever_has_segments(segmented, mode, group):
    a_ids, a_seg, b_ids, b_seg, truth = _segmented_sets()
    a_seg = a_seg if segmented in ("a", "both") else None
    b_seg = b_seg if segmented in ("b", "both") else None
    ta, tb = LocalTransport.pair(record=True, timeout=120)
    out: dict = {}

    def side(key, party, transport):
        out[key] = run_match(party, transport, MatchConfig(mode, group=group))

    threads = [threading.Thread(target=side, args=(
                   "a", MatchParty("a", "crm_a", normalize_ids(a_ids, "email"), a_seg), ta)),
               threading.Thread(target=side, args=(
                   "b", MatchParty("b", "crm_b", normalize_ids(b_ids, "email"), b_seg), tb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ra, rb = out["a"], out["b"]
    assert ra.overlap == rb.overlap == 50
    if a_seg:
        assert ra.segment_overlap == {"regular": 30, "vip": 20}
    if b_seg:
        assert rb.segment_overlap == {"high-risk": 30, "low-risk": 20}
    for transport, segs in ((ta, a_seg), (tb, b_seg)):
        kinds = [k for k, _ in transport.recorder.sent]
        assert kinds.count("encrypted") == kinds.count("double") == 1
        assert ("encrypted-grouped" in kinds) == (segs is not None)


def test_curious_linking_party_learns_its_matched_rows_but_not_partner_segments(monkeypatch):
    """With matched rows on both sides (`psi` linking mode) a side learns which of its rows match
    (consented), still not the partner's segment of each of them."""
    a_ids, a_seg, b_ids, b_seg, truth = _segmented_sets()
    ra, rb, ta, party_a, kept = _run_curious_pair(monkeypatch, a_ids, a_seg, b_ids, b_seg,
                                                  mode="psi", reveal=True)
    assert ra.revealed and len(ra.matched_rows) == 50
    candidates, own_names = _attack(ta, party_a, kept)
    target = _as_blocks(truth, own_names, sorted(set(b_seg)))
    assert not [(x, y) for x, y, table in candidates if table == target]


# --------------------------------------------------------------------------- 2. hash, low entropy


def _phones(n: int, start: int = 0) -> list[str]:
    return [f"020 7946 {i:04d}" for i in range(start, start + n)]  # Ofcom's fictional London range


def _hash_cli(tmp_path, values, *args, kind="phone", column="phone"):
    ours = write_csv(tmp_path / "ours.csv", [column], [(v,) for v in values])
    home = tmp_path / "home"
    region = ["--default-region", "GB"] if kind == "phone" else []
    return home, CliRunner().invoke(match_app, [
        "--mode", "hash", "--ids", str(ours), "--column", column, "--kind", kind, *region,
        "--no-require-consent", "--home", str(home), *args])


@pytest.mark.parametrize("kind,values", [
    ("phone", _phones(40)),
    ("string", [f"{100200 + i}" for i in range(40)]),  # numeric customer numbers
    ("string", [f"19{60 + i % 40}-0{1 + i % 9}-1{i % 10}" for i in range(40)]),  # dates of birth
])
def test_hash_mode_on_low_entropy_ids_is_refused_before_anything_happens(tmp_path, kind, values):
    start = time.monotonic()
    home, r = _hash_cli(tmp_path, values, "--connect", "127.0.0.1:1", "--connect-timeout", "60",
                        kind=kind, column="id")
    assert isinstance(r.exception, ConfigurationError), (r.output, r.exception)
    message = str(r.exception)
    assert "\n" not in message and "--mode psi" in message
    assert "--accept-enumeration-risk" in message and "low-entropy" in message
    assert time.monotonic() - start < 20  # refused before dialling
    assert not (home / "ledger.db").exists()  # nothing written, nothing charged


def test_hash_mode_refusal_is_a_one_line_error_with_exit_code_2(tmp_path):
    ours = write_csv(tmp_path / "ours.csv", ["phone"], [(v,) for v in _phones(20)])
    done = subprocess.run(
        [sys.executable, "-c", "from fedpact.service.cli import main; main()", "match",
         "--mode", "hash", "--connect", "127.0.0.1:1", "--ids", str(ours), "--column", "phone",
         "--kind", "phone", "--default-region", "GB", "--no-require-consent",
         "--home", str(tmp_path / "home")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: --mode hash refused") and "--mode psi" in lines[0]
    assert not (tmp_path / "home" / "ledger.db").exists()


def test_email_and_opaque_ids_are_not_low_entropy():
    assert enumeration_risk("email", ["anna@example.org"]) is None
    assert enumeration_risk("string", ["7590-VHVEG", "5575-GNVDE"] * 20) is None  # Telco ids
    assert enumeration_risk("string", ["3f2b9c1e-8d7a-4c55-9e1b-2a6f0c4d7e88"]) is None
    assert enumeration_risk("string", ["12345678901234"]) is None  # 14 digits: 10^14
    assert enumeration_risk("phone", ["+442079460000"]) is not None


def _serve(transport, party, config, out):
    try:
        with transport:
            out["b"] = run_match(party, transport, config)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        out["b"] = exc


def test_accepted_hash_run_on_phones_states_the_residual_risk(tmp_path):
    theirs = normalize_ids(_phones(30, start=20), "phone", "GB")
    server = listen("127.0.0.1:0", timeout=60)
    out: dict = {}
    t = threading.Thread(target=_serve, args=(server, MatchParty("retailer", "pos", theirs),
                                              MatchConfig("hash", accept_enumeration_risk=True),
                                              out))
    t.start()
    home, r = _hash_cli(tmp_path, _phones(40), "--connect", f"127.0.0.1:{server.port}",
                        "--accept-enumeration-risk", "--json", "--min-count", "1",
                        "--report-out", str(tmp_path / "report.json"))
    t.join(60)
    assert r.exit_code == 0, (r.output, r.exception)
    report = json.loads(r.stdout)
    assert report["overlap"] == out["b"].overlap == 20
    for stated in (report["residual_risk"],
                   json.loads((tmp_path / "report.json").read_text())["residual_risk"]):
        assert stated.startswith("residual risk accepted (--accept-enumeration-risk)")
        assert "phone numbers are low-entropy" in stated and "recover every identifier" in stated
    assert "warning" in r.stderr and "low-entropy" in r.stderr
    with Ledger.open(home / "ledger.db") as ledger:
        (done,) = ledger.events(event_type=EventType.MATCH_COMPLETED)
    assert done.payload["enumeration_risk"] == {"accepted": True,
                                                "statement": report["residual_risk"]}
    # the responder holds the key: its statement says what it could do with the hashes
    assert "this node holds the job key" in out["b"].enumeration_risk
    assert build_overlap_report(out["b"]).residual_risk == out["b"].enumeration_risk


def test_a_side_that_did_not_accept_the_risk_stops_both_before_any_hash_travels():
    a = normalize_ids(_phones(30), "phone", "GB")
    b = normalize_ids(_phones(30, start=10), "phone", "GB")
    ta, tb = LocalTransport.pair(record=True, timeout=60)
    out: dict = {}

    def side(key, party, transport, config):
        try:
            out[key] = run_match(party, transport, config)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out[key] = exc

    threads = [threading.Thread(target=side, args=(
                   "a", MatchParty("a", "crm_a", a), ta,
                   MatchConfig("hash", accept_enumeration_risk=True))),
               threading.Thread(target=side, args=(
                   "b", MatchParty("b", "crm_b", b), tb, MatchConfig("hash")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(out["b"], ConfigurationError) and "--accept-enumeration-risk" in str(out["b"])
    assert [kind for kind, _ in tb.recorder.sent] == ["abort"]  # not even the hello
    assert "the partner stopped the match job" in str(out["a"])
    assert "--mode hash refused" in str(out["a"]) and "\n" not in str(out["a"])
    assert "tokens" not in [kind for kind, _ in ta.recorder.sent]


def test_record_match_writes_the_accepted_risk(tmp_path, capsys):
    a = normalize_ids(_phones(30), "phone", "GB")
    b = normalize_ids(_phones(30, start=10), "phone", "GB")
    ta, tb = LocalTransport.pair(timeout=60)
    config = MatchConfig("hash", accept_enumeration_risk=True)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(b=run_match(MatchParty("b", "crm_b", b), tb,
                                                               config)))
    t.start()
    ra = run_match(MatchParty("a", "crm_a", a), ta, config)
    t.join(60)
    with Ledger.open(tmp_path / "l.db") as ledger:
        record_match(ledger, ra, build_overlap_report(ra, min_count=1))
        (done,) = ledger.events(event_type=EventType.MATCH_COMPLETED)
    assert done.payload["enumeration_risk"]["statement"] == ra.enumeration_risk
    cli_match._print_result(ra, build_overlap_report(ra, min_count=1), 1, None)  # without --json
    assert "residual risk" in capsys.readouterr().out


def test_why_enumeration_attack_recovers_every_phone_number_from_the_keyed_hashes(monkeypatch):
    """The responder of a hash job holds the job key (it must, to hash its own customers): it
    hashes a whole block of numbers and reads every number the initiator sent, matched or not."""
    kept: list[bytes] = []
    real_derive = protocol_module.KeyAgreement.derive

    def derive(self, peer, *, initiator, job_id):
        keys = real_derive(self, peer, initiator=initiator, job_id=job_id)
        if not initiator:  # the curious responder keeps a copy of the HMAC key
            kept.append(bytes(keys._hmac_key))
        return keys

    monkeypatch.setattr(protocol_module.KeyAgreement, "derive", derive)
    secret_numbers = [f"020 7946 {n:04d}" for n in (17, 404, 1234, 2718, 3141, 4242, 5000,
                                                       6174, 8128, 9999)]
    a = normalize_ids(secret_numbers, "phone", "GB")
    b = normalize_ids(secret_numbers[:3] + _phones(20, start=7000), "phone", "GB")
    ta, tb = LocalTransport.pair(record=True, timeout=60)
    config = MatchConfig("hash", accept_enumeration_risk=True)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(b=run_match(MatchParty("b", "crm_b", b), tb,
                                                               config)))
    t.start()
    ra = run_match(MatchParty("a", "crm_a", a), ta, config)
    t.join(60)
    assert ra.overlap == out["b"].overlap == 3
    (key,) = kept
    received = dict(tb.recorder.received)["tokens"]
    tokens = {received[i:i + TOKEN_BYTES] for i in range(0, len(received), TOKEN_BYTES)}
    start = time.perf_counter()
    block = [f"+4420794{i:05d}" for i in range(100_000)]  # every number of a 10^5 block
    hashed = hmac_tokens(block, key)
    recovered = {block[i // TOKEN_BYTES] for i in range(0, len(hashed), TOKEN_BYTES)
                 if hashed[i:i + TOKEN_BYTES] in tokens}
    seconds = time.perf_counter() - start
    assert recovered == set(a.values)  # all ten, although only three are the responder's
    assert seconds < 10
