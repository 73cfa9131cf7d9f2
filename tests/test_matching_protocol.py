"""Match jobs in one process: every mode gives exactly the plain set intersection, nothing leaks."""

from __future__ import annotations

import hashlib
import random
import string
import threading

import numpy as np
import pandas as pd
import pytest

from fedpact.errors import ConfigurationError
from fedpact.privacy.matching import (
    KeyAgreement,
    LocalTransport,
    MatchConfig,
    MatchParty,
    MatchProtocolError,
    group_named,
    normalize_ids,
    run_match,
)

MODES = [("hash", "x25519"), ("psi", "x25519"), ("psi-cardinality", "x25519"),
         ("psi-cardinality", "ristretto255")]


def run_pair(ids_a, ids_b, mode, *, group="x25519", reveal=(False, False), segments_a=None,
             config_b=None, record=False, config_a=None):
    """Both sides of a job in two threads; returns (result_a, result_b, transport_a, transport_b)."""
    ta, tb = LocalTransport.pair(record=record, timeout=120)
    parties = [(MatchParty("alpha", "crm_a", ids_a, segments_a), ta,
                config_a or MatchConfig(mode, group=group, reveal_matches=reveal[0])),
               (MatchParty("beta", "crm_b", ids_b), tb,
                config_b or MatchConfig(mode, group=group, reveal_matches=reveal[1]))]
    out: list = [None, None]

    def side(i):
        party, transport, config = parties[i]
        try:
            out[i] = run_match(party, transport, config)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out[i] = exc

    threads = [threading.Thread(target=side, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out[0], out[1], ta, tb


def synthetic_sets(n_a, n_b, shared, seed=0):
    rng = random.Random(seed)
    people = [f"{''.join(rng.choices(string.ascii_lowercase, k=8))}{i}@example.org"
              for i in range(n_a + n_b - shared)]
    return people[:n_a], people[n_a - shared:]


def real_format_ids(seed=1):
    """Synthetic e-mails and phones written the way CRM exports write them, with a known overlap."""
    rng = random.Random(seed)
    names = ["anna", "ben", "chloe", "dmitri", "eve", "farah", "gus", "hana", "ivan", "jo"]
    people = []
    for i in range(400):
        local = f"{rng.choice(names)}.{rng.choice(names)}{i}"
        domain = rng.choice(["gmail.com", "outlook.com", "example.co.uk", "web.de"])
        people.append((local, domain))

    def spell(local, domain):
        if domain == "gmail.com":
            local = local.replace(".", "") if rng.random() < 0.5 else local
            local += "+promo" if rng.random() < 0.3 else ""
        text = f"{local}@{domain}"
        text = rng.choice([text, text.upper(), text.title(), f"  {text}\t"])
        return text

    a_people, b_people = people[:300], people[200:]
    a = [spell(*p) for p in a_people] + ["not an email", "x@@y.com", ""]
    b = [spell(*p) for p in b_people] + ["@gmail.com"]
    return a, b, 100


def phone_sets():
    gb = [f"+44 20 7946 {i:04d}" for i in range(0, 300)]
    us = [f"+1 212 555 {i:04d}" for i in range(0, 300)]
    in_ = [f"+91 98765 {i:05d}" for i in range(0, 300)]
    a = gb[:200] + us[:200] + in_[:100]
    # the partner writes the same numbers in national format (default region GB) or 00-international
    b = ([f"020 7946 {i:04d}" for i in range(100, 300)]
         + [f"001 (212) 555-{i:04d}" for i in range(150, 300)]
         + [f"0091 98765 {i:05d}" for i in range(50, 200)] + ["12345", "phone: n/a"])
    expected = 100 + 50 + 50
    return a, b, expected


@pytest.mark.parametrize("mode,group", MODES)
def test_overlap_equals_plain_set_intersection(mode, group):
    raw_a, raw_b = synthetic_sets(3000, 2500, 1234)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    truth = len(set(a.values) & set(b.values))
    assert truth == 1234
    ra, rb, _, _ = run_pair(a, b, mode, group=group)
    assert not isinstance(ra, Exception), ra
    assert not isinstance(rb, Exception), rb
    assert ra.overlap == rb.overlap == truth
    assert ra.job_id == rb.job_id and ra.job_id.startswith("match-")
    assert ra.matched_rows is None and rb.matched_rows is None  # nobody opted in


@pytest.mark.parametrize("mode", ["hash", "psi", "psi-cardinality"])
def test_real_format_emails_and_phones(mode):
    raw_a, raw_b, expected = real_format_ids()
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    assert a.invalid == 3 and b.invalid == 1
    ra, rb, _, _ = run_pair(a, b, mode)
    assert ra.overlap == rb.overlap == expected == len(set(a.values) & set(b.values))
    pa, pb, expected = phone_sets()
    na, nb = normalize_ids(pa, "phone", "GB"), normalize_ids(pb, "phone", "GB")
    assert nb.invalid_by_reason == {"invalid_number": 1, "not_a_number": 1}
    if mode == "hash":  # phone numbers are enumerable: hash mode only with the risk accepted
        ra, rb, _, _ = run_pair(na, nb, mode)
        assert isinstance(ra, ConfigurationError) and "--accept-enumeration-risk" in str(ra)
        accepted = MatchConfig(mode, accept_enumeration_risk=True)
        ra, rb, _, _ = run_pair(na, nb, mode, config_a=accepted, config_b=accepted)
        assert "residual risk" in ra.enumeration_risk and "residual risk" in rb.enumeration_risk
    else:
        ra, rb, _, _ = run_pair(na, nb, mode)
        assert ra.enumeration_risk is None
    assert ra.overlap == rb.overlap == expected


@pytest.mark.shared_data
@pytest.mark.parametrize("mode", ["hash", "psi-cardinality"])
def test_telco_customer_ids(shared_data, mode):
    frame = pd.read_csv(shared_data / "WA_Fn-UseC_-Telco-Customer-Churn.csv",
                        usecols=["customerID", "Churn"])
    ids = frame["customerID"].tolist()
    a_rows, b_rows = ids[:4500], [s.lower() for s in ids[3000:]]  # partner exports lower case
    a = normalize_ids(a_rows, "string")
    b = normalize_ids(b_rows, "string")
    ra, rb, _, _ = run_pair(a, b, mode, segments_a=frame["Churn"].tolist()[:4500])
    assert ra.overlap == rb.overlap == 1500 == len(set(a.values) & set(b.values))
    if mode == "hash":  # the sending side does not learn which rows matched without opt-in
        assert ra.segment_overlap is None and ra.segment_sizes == {"No": 3321, "Yes": 1179}
        return
    churn = frame["Churn"].tolist()
    assert ra.segment_overlap == {v: sum(c == v for c in churn[3000:4500]) for v in ("No", "Yes")}


def test_psi_cardinality_agrees_with_openmined_psi():
    psi = pytest.importorskip("private_set_intersection.python",
                              reason="openmined-psi is the test-only reference peer")
    raw_a, raw_b = synthetic_sets(2000, 3000, 777, seed=5)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    ra, _, _, _ = run_pair(a, b, "psi-cardinality")
    client = psi.client.CreateWithNewKey(False)
    server = psi.server.CreateWithNewKey(False)
    setup = server.CreateSetupMessage(0.0, len(a.values), b.values, psi.DataStructure.RAW)
    response = server.ProcessRequest(client.CreateRequest(a.values))
    assert client.GetIntersectionSize(setup, response) == ra.overlap == 777


def _plain_hashes(values):
    out = set()
    for v in values:
        for algo in ("md5", "sha1", "sha256", "sha512"):
            d = hashlib.new(algo, v.encode()).digest()
            out.add(d)
            out.add(d.hex().encode())
    return out


@pytest.mark.parametrize("mode", ["hash", "psi", "psi-cardinality"])
def test_transcript_holds_no_identifier_or_plain_hash(mode):
    """Nothing either party sends contains an identifier (raw or normalised) or a plain hash of one,
    and nothing about the partner's unmatched identifiers."""
    raw_a, raw_b = synthetic_sets(300, 300, 100, seed=9)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    ra, rb, ta, tb = run_pair(a, b, mode, reveal=(True, True) if mode != "psi-cardinality" else
                              (False, False), record=True)
    assert ra.overlap == 100
    unmatched_b = set(b.values) - set(a.values)
    needles = {v.encode() for v in a.values + b.values} | _plain_hashes(a.values + b.values)
    needles |= {v[:12].encode() for v in unmatched_b}  # even a fragment of a local part
    for transport in (ta, tb):
        blob = b"\n".join(p for _, p in transport.recorder.sent)
        assert len(blob) > 0
        found = [n for n in needles if n in blob]
        assert not found, f"{transport.role} sent identifier material: {found[:3]}"
    for transport, ids in ((ta, a), (tb, b)):
        sent = dict(transport.recorder.sent)
        binary = sent["tokens" if mode == "hash" else "encrypted"] if (
            mode != "hash" or transport.role == "initiator") else b""
        width = 16 if mode == "hash" else 32
        assert len(binary) in (0, width * len(set(ids.values)))  # fixed-size records only


def test_matched_rows_only_when_both_sides_opt_in():
    raw_a, raw_b = synthetic_sets(500, 400, 150, seed=3)
    a, b = normalize_ids(raw_a + raw_a[:5], "email"), normalize_ids(raw_b, "email")
    for mode in ("hash", "psi"):
        ra, rb, _, _ = run_pair(a, b, mode, reveal=(True, False))
        assert ra.matched_rows is None and rb.matched_rows is None and ra.overlap == 150
        ra, rb, _, _ = run_pair(a, b, mode, reveal=(True, True))
        shared = set(a.values) & set(b.values)
        assert {raw_a[i % 500] for i in ra.matched_rows.tolist()} == {
            r for r in raw_a if r in shared}
        assert len(ra.matched_rows) == 150 + sum(r in shared for r in raw_a[:5])  # duplicates too
        # the same person gets the same token on both sides, and tokens differ between people
        tok_a = {a.values[int(np.nonzero(a.rows == r)[0][0])]: t
                 for r, t in zip(ra.matched_rows.tolist(), ra.tokens, strict=True)}
        tok_b = {b.values[r]: t for r, t in zip(rb.matched_rows.tolist(), rb.tokens, strict=True)}
        assert tok_a == tok_b and len(set(tok_a.values())) == 150
        # job-scoped: a second job over the same sets gives unrelated tokens
        ra2, _, _, _ = run_pair(a, b, mode, reveal=(True, True))
        assert ra2.job_id != ra.job_id and not set(ra2.tokens) & set(ra.tokens)


def test_cardinality_mode_refuses_to_reveal_rows():
    with pytest.raises(ConfigurationError, match="psi-cardinality"):
        MatchConfig("psi-cardinality", reveal_matches=True)


def test_mismatched_settings_stop_both_sides_with_a_named_parameter():
    a = normalize_ids([f"user{i}@x.com" for i in range(12)], "email")  # k = 10 in PSI
    ra, rb, _, _ = run_pair(a, a, "psi", config_b=MatchConfig("hash"))
    assert isinstance(ra, ConfigurationError) and "--mode" in str(ra)
    assert isinstance(rb, ConfigurationError) and "--mode" in str(rb)
    ra, rb, _, _ = run_pair(a, a, "psi", config_b=MatchConfig("psi", group="ristretto255"))
    assert isinstance(ra, ConfigurationError) and "--group" in str(ra)
    ra, rb, _, _ = run_pair(normalize_ids([f"u{i}@y.com" for i in range(13)], "email"), a, "hash",
                            config_b=MatchConfig("hash", max_peer_ids=12))
    assert isinstance(rb, ConfigurationError) and "max_peer_ids" in str(rb)
    assert isinstance(ra, MatchProtocolError) and "max_peer_ids" in str(ra)


def test_keys_are_fresh_per_job_and_erased():
    a1, b1 = KeyAgreement(), KeyAgreement()
    a2 = KeyAgreement()
    assert a1.share.public_key != a2.share.public_key and a1.share.nonce != a2.share.nonce
    ka = a1.derive(b1.share, initiator=True, job_id="j1")
    kb = b1.derive(a1.share, initiator=False, job_id="j1")
    assert ka.hash_ids(["x@y.com"]) == kb.hash_ids(["x@y.com"])
    with pytest.raises(MatchProtocolError):
        a1.derive(b1.share, initiator=True, job_id="j1")  # single use
    ka.erase()
    assert "erased" in repr(ka)
    with pytest.raises(MatchProtocolError):
        ka.hash_ids(["x@y.com"])
    b2 = KeyAgreement()
    k2 = a2.derive(b2.share, initiator=True, job_id="j2")
    assert k2.hash_ids(["x@y.com"]) != kb.hash_ids(["x@y.com"])  # never a reused salt


@pytest.mark.parametrize("group", ["x25519", "ristretto255"])
def test_group_is_commutative_and_rejects_degenerate_points(group):
    g = group_named(group)
    values = [f"id-{i}".encode() for i in range(200)]
    h = g.hash_to_group(values, b"job")
    assert len({bytes(h[i:i + 32]) for i in range(0, len(h), 32)}) == 200
    assert h != g.hash_to_group(values, b"other-job")  # domain separated per job
    ka, kb = g.new_scalar(), g.new_scalar()
    assert g.multiply(kb, g.multiply(ka, h)) == g.multiply(ka, g.multiply(kb, h, workers=2))
    with pytest.raises(MatchProtocolError, match="degenerate"):
        g.multiply(ka, bytes(32 * 3))
    with pytest.raises(MatchProtocolError, match="whole number"):
        g.multiply(ka, bytes(33))
    ka.erase()
    with pytest.raises(MatchProtocolError, match="erased"):
        g.multiply(ka, h)


def test_partner_failure_reaches_the_other_side():
    a = normalize_ids([f"user{i}@x.com" for i in range(12)], "email")
    ta, tb = LocalTransport.pair(timeout=30)
    errors = []

    def broken_partner():
        tb.recv("hello")
        tb.send("hello", b"{not json")

    t = threading.Thread(target=broken_partner)
    t.start()
    with pytest.raises(MatchProtocolError, match="not valid JSON"):
        run_match(MatchParty("alpha", "crm_a", a), ta, MatchConfig("psi"))
    t.join()
    assert not errors


# RFC 9380 appendix J.7.2, curve25519_XMD:SHA-512_ELL2_NU_: msg, u[0], Q.x (map_to_curve), P.x
# (after clear_cofactor, i.e. 8Q). Coordinates big-endian hex as printed in the RFC.
RFC9380_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
RFC9380_NU = [
    ("", "608d892b641f0328523802a6603427c26e55e6f27e71a91a478148d45b5093cd",
     "51125222da5e763d97f3c10fcc92ea6860b9ccbbd2eb1285728f566721c1e65b",
     "1bb913f0c9daefa0b3375378ffa534bda5526c97391952a7789eb976edfe4d08"),
    ("abc", "46f5b22494bfeaa7f232cc8d054be68561af50230234d7d1d63d1d9abeca8da5",
     "7d56d1e08cb0ccb92baf069c18c49bb5a0dcd927eff8dcf75ca921ef7f3e6eeb",
     "7c22950b7d900fa866334262fcaea47a441a578df43b894b4625c9b450f9a026"),
    ("abcdef0123456789", "235fe40c443766ce7e18111c33862d66c3b33267efa50d50f9e8e5d252a40aaa",
     "3fbe66b9c9883d79e8407150e7c2a1c8680bee496c62fabe4619a72b3cabe90f",
     "31ad08a8b0deeb2a4d8b0206ca25f567ab4e042746f792f4b7973f3ae2096c52"),
    ("q128_" + "q" * 128, "001e92a544463bda9bd04ddbe3d6eed248f82de32f522669efc5ddce95f46f5b",
     "227e0bb89de700385d19ec40e857db6e6a3e634b1c32962f370d26f84ff19683",
     "027877759d155b1997d0d84683a313eb78bdb493271d935b622900459d52ceaa"),
    ("a512_" + "a" * 512, "1a68a1af9f663592291af987203393f707305c7bac9c8d63d6a729bdc553dc19",
     "3bcd651ee54d5f7b6013898aab251ee8ecc0688166fce6e9548d38472f6bd196",
     "5fd892c0958d1a75f54c3182a18d286efab784e774d1e017ba2fb252998b5dc1"),
]
P25519, A25519 = 2**255 - 19, 486662


def _x_double(x: int) -> int:
    """x(2Q) on the Montgomery curve y^2 = x^3 + A x^2 + x (x-only doubling)."""
    return (x * x - 1) ** 2 * pow(4 * x * (x * x + A25519 * x + 1), -1, P25519) % P25519


def _x25519(scalar: bytes, x: int) -> int:
    from fedpact.privacy.matching.groups import SecretScalar, X25519Group

    g = X25519Group()
    s = SecretScalar(32)
    import ctypes

    ctypes.memmove(s.address, scalar, 32)
    out = g.multiply(s, x.to_bytes(32, "little"))
    return int.from_bytes(out, "little")


def test_x25519_hash_to_curve_matches_rfc9380_vectors():
    """The x25519 group hashes with RFC 9380 curve25519_XMD:SHA-512_ELL2_NU_ (Elligator 2)."""
    from fedpact.privacy.matching.groups import (
        H2C_SUITE,
        X25519Group,
        elligator2_curve25519,
        encode_to_curve25519_x,
        hash_to_field_curve25519,
    )

    assert H2C_SUITE == "curve25519_XMD:SHA-512_ELL2_NU_"
    g = X25519Group()
    batch = g.encode_batch([m.encode() for m, *_ in RFC9380_NU] * 1000, RFC9380_DST)
    for i, (msg, u0, qx, px) in enumerate(RFC9380_NU):
        assert hash_to_field_curve25519(msg.encode(), RFC9380_DST) == int(u0, 16)
        assert elligator2_curve25519(int(u0, 16)) == int(qx, 16)
        assert encode_to_curve25519_x(msg.encode(), RFC9380_DST) == int(qx, 16)
        q = int.from_bytes(batch[32 * i:32 * i + 32], "little")
        assert q == int(qx, 16)
        assert _x_double(_x_double(_x_double(q))) == int(px, 16)  # clear_cofactor: P = 8Q
    # the batched form (one inversion per chunk) agrees past a chunk boundary
    for j in (4095, 4096, 4999):
        k = j % len(RFC9380_NU)
        assert int.from_bytes(batch[32 * j:32 * j + 32], "little") == int(RFC9380_NU[k][2], 16)


def _ladder(n: int, x: int) -> int:
    """n·(x, ·) on Curve25519, x-only, by the RFC 7748 Montgomery ladder (no clamping; O -> 0)."""
    p, a24 = P25519, (A25519 - 2) // 4
    x2, z2, x3, z3, swap = 1, 0, x, 1, 0
    for t in reversed(range(n.bit_length())):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % p, (x2 - z2) % p
        c, d = (x3 + z3) % p, (x3 - z3) % p
        da, cb, aa, bb = d * a % p, c * b % p, a * a % p, b * b % p
        e = (aa - bb) % p
        x3, z3 = (da + cb) ** 2 % p, x * (da - cb) ** 2 % p
        x2, z2 = aa * bb % p, e * (aa + a24 * e) % p
    if swap:
        x2, z2 = x3, z3
    return x2 * pow(z2, p - 2, p) % p


def test_x25519_clamping_clears_the_cofactor_and_commutes():
    """clamp(k)·Q = (clamp(k)/8)·P where P = 8Q is the RFC's cofactor-cleared output, so X25519 on
    the un-cleared hash equals blinding the RFC 9380 point; results have prime order; commutes."""
    import secrets

    order = 2**252 + 27742317777372353535851937790883648493
    for _, _, qx, px in RFC9380_NU:
        q, p_cleared = int(qx, 16), int(px, 16)
        assert _ladder(8, q) == p_cleared
        k = bytearray(secrets.token_bytes(32))
        k[0] &= 248
        k[31] = (k[31] & 127) | 64  # RFC 7748 clamping, as X25519 does internally
        clamped = int.from_bytes(k, "little")
        r = _x25519(bytes(k), q)
        assert r == _ladder(clamped, q) == _ladder(clamped // 8, p_cleared)
        assert _ladder(order, r) == 0  # in the prime-order subgroup
    q = int(RFC9380_NU[1][2], 16)
    ka, kb = secrets.token_bytes(32), secrets.token_bytes(32)
    assert _x25519(kb, _x25519(ka, q)) == _x25519(ka, _x25519(kb, q))


SMALL_ORDER_U = [0, 1, 325606250916557431795983626356110631294008115727848805560023387167927233504,
                 39382357235489614581723060781553021112529911719440698176882885853963445705823,
                 2**255 - 19 - 1, 2**255 - 19, 2**255 - 19 + 1]


def test_x25519_openssl_and_libsodium_paths_agree_and_reject_the_same_points():
    """One worker multiplies with OpenSSL (`cryptography`), several with libsodium threads: the
    results must be the same bytes, and both must refuse every small-order input."""
    g = group_named("x25519")
    h = g.hash_to_group([f"id-{i}".encode() for i in range(5000)], b"job")
    k = g.new_scalar()
    assert g.multiply(k, h, workers=1) == g.multiply(k, h, workers=2)
    for u in SMALL_ORDER_U:
        bad = h[:32 * 10] + u.to_bytes(32, "little") + h[32 * 10:32 * 20]
        for workers in (1, 2):
            with pytest.raises(MatchProtocolError, match="degenerate"):
                g.multiply(k, bad, workers=workers)
