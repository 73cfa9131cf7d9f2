"""Data-subject requests: access export, rectification, erasure by crypto-shredding."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.dsar import ERASED, SubjectRequests, flagged_models
from fedpact.audit.verifier import verify_inclusion_bundle

PURPOSE = "churn model"
RAW_ID = "7590-VHVEG"
EMAIL = "jane.doe@example.org"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "run"


def _setup(ledger: Ledger) -> ConsentRegistry:
    registry = ConsentRegistry(ledger)
    at = datetime(2025, 3, 1, tzinfo=UTC)
    registry.grant(RAW_ID, PURPOSE, channel="web", legal_basis="consent", notice_version="v3",
                   source="signup form", at=at, personal={"email": EMAIL})
    registry.grant(RAW_ID, "marketing", channel="web", legal_basis="consent", notice_version="v3",
                   source="signup form", at=at)
    registry.grant("5575-GNVDE", PURPOSE, channel="app", legal_basis="consent",
                   notice_version="v3", source="app", at=at)
    registry.enforce("job-1", "telco", PURPOSE, [RAW_ID, "5575-GNVDE", "0000-NONE"])
    ledger.append(EventType.JOB_FINISHED, {"metrics": {"auc": 0.8}, "epsilon": 1.0},
                  actor="coordinator", job_id="job-1")
    ledger.append(EventType.MODEL_DELIVERED, {"model": "job-1/model.pt", "recipient": "bank-a",
                                                  "purpose": PURPOSE}, actor="coordinator",
                  job_id="job-1")
    registry.enforce("job-2", "telco", PURPOSE, ["5575-GNVDE"])  # a job without our subject
    return registry


def test_access_exports_everything_held_as_json_and_csv(home: Path) -> None:
    with Ledger.open(home / "ledger.db") as ledger:
        _setup(ledger)
        requests = SubjectRequests(ledger)
        report = requests.access(RAW_ID, channel="email")
        requests_events = ledger.events(event_type=EventType.DSAR_FULFILLED)
    data = json.loads(report.to_json())
    assert data["personal_data"] == {"subject_id": RAW_ID, "email": EMAIL}
    assert {c["purpose"]: c["status"] for c in data["consents"]} == {
        PURPOSE: "granted", "marketing": "granted"}
    assert data["jobs_that_used_the_data"] == [{"job_id": "job-1", "dataset": "telco"}]
    kinds = [e["event_type"] for e in data["events"]]
    assert kinds == ["consent.granted", "consent.granted", "dsar.received"]
    assert data["events"][0]["personal"] == {"subject_id": RAW_ID, "email": EMAIL}
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["event_type"] for r in rows] == kinds and EMAIL in rows[0]["personal_fields"]
    assert requests_events[-1].payload["kind"] == "access"


def test_rectification_shows_the_corrected_value(home: Path) -> None:
    with Ledger.open(home / "ledger.db") as ledger:
        _setup(ledger)
        requests = SubjectRequests(ledger)
        requests.rectify(RAW_ID, {"email": "jane@new.example.org"})
        report = requests.report(RAW_ID)
        with pytest.raises(LedgerError, match="cannot be rectified"):
            requests.rectify(RAW_ID, {"subject_id": "other"})
    assert report.personal_data["email"] == "jane@new.example.org"
    assert "subject.rectified" in [e["event_type"] for e in report.events]


def test_erasure_shreds_everywhere_and_proofs_still_verify(home: Path) -> None:
    with Ledger.open(home / "ledger.db", checkpoint_every=5) as ledger:
        registry = _setup(ledger)
        requests = SubjectRequests(ledger)
        subject = registry.pseudonym(RAW_ID)
        before = requests.report(RAW_ID)
        assert before.personal_data["email"] == EMAIL
        grant_seq = next(e["seq"] for e in before.events if e["event_type"] == "consent.granted")
        proof_before = ledger.prove(grant_seq)

        erased = requests.erase(RAW_ID, channel="letter")
        assert erased.keys_destroyed >= 1 and sorted(erased.consents_withdrawn) == sorted(["marketing", PURPOSE])
        assert erased.models_flagged == ["job-1/model.pt"]
        assert flagged_models(ledger)[0]["job_id"] == "job-1"

        after = requests.report(RAW_ID)
        assert after.erased and after.personal_data == {}
        assert all(e.get("personal") in (None, ERASED) for e in after.events)
        assert registry.allowed([RAW_ID, "5575-GNVDE"], PURPOSE).tolist() == [False, True]
        # the other subject is untouched
        assert requests.report("5575-GNVDE").personal_data == {"subject_id": "5575-GNVDE"}
        with pytest.raises(LedgerError, match="was erased"):
            registry.grant(RAW_ID, PURPOSE, channel="web", legal_basis="consent",
                           notice_version="v3", source="x", at=datetime(2025, 3, 1, tzinfo=UTC))

        result = ledger.verify()
        key = ledger.verifier_key
        proof_after = ledger.prove(grant_seq)
    assert result.ok and result.events_checked >= 10
    assert verify_inclusion_bundle(proof_before, key).seq == grant_seq
    assert verify_inclusion_bundle(proof_after, key).seq == grant_seq
    assert proof_before["event"] == proof_after["event"]  # same event, ciphertext unchanged

    # A search of every file of the deployment finds no readable trace of the raw identifiers.
    for path in home.iterdir():
        content = path.read_bytes()
        for needle in (RAW_ID.encode(), EMAIL.encode(), RAW_ID.encode("utf-16-le")):
            assert needle not in content, f"{needle!r} readable in {path.name}"
    assert subject.encode() in (home / "ledger.db").read_bytes() or (home / "ledger.db-wal").exists()


def test_erasure_removes_wrapped_key_bytes_from_the_files(home: Path) -> None:
    import sqlite3

    with Ledger.open(home / "ledger.db") as ledger:
        registry = _setup(ledger)
        subject = registry.pseudonym(RAW_ID)
        db = sqlite3.connect(home / "ledger.db")
        wrapped = [bytes(w) for (w,) in db.execute(
            "SELECT wrapped FROM subject_keys WHERE subject = ?", (subject,))]
        db.close()
        assert wrapped and all(len(w) == 60 for w in wrapped)
        SubjectRequests(ledger).erase(RAW_ID)
    files = b"".join(p.read_bytes() for p in home.iterdir() if p.is_file())
    for blob in wrapped:
        assert blob not in files


def test_erasure_and_access_reach_the_partner_registry(tmp_path: Path) -> None:
    """The subjects a job used are kept in the partner's own registry (its own key), the
    coordinator's ledger has only a count: erasure and access search the registry, flag the model
    in the coordinator's ledger; without the registry the model is reported, not silently missed."""
    with Ledger.open(tmp_path / "coordinator" / "ledger.db") as home, \
            Ledger.open(tmp_path / "partner" / "ledger.db") as partner:
        own = ConsentRegistry(partner)
        own.grant(RAW_ID, PURPOSE, channel="web", legal_basis="consent", notice_version="v3",
                  source="signup form", at=datetime(2025, 3, 1, tzinfo=UTC), personal={"email": EMAIL})
        mask = own.enforce("job-1", "telco", PURPOSE, [RAW_ID, "5575-GNVDE"])
        [used] = partner.events(job_id="job-1", event_type=EventType.SUBJECTS_USED)
        ConsentRegistry(home).record_subjects_held_by_partner(
            "job-1", "telco", PURPOSE, int(mask.sum()),
            partner_manifest_sha256=used.payload["manifest_sha256"], consent="enforced")
        home.append(EventType.JOB_FINISHED, {"metrics": {}, "epsilon": 1.0}, actor="coordinator",
                    job_id="job-1")
        assert own.pseudonym(RAW_ID) != ConsentRegistry(home).pseudonym(RAW_ID)  # two keys

        unsearched = SubjectRequests(home).report(RAW_ID)
        assert unsearched.jobs == [] and unsearched.consents == []
        report = SubjectRequests(home, registries=[partner]).report(RAW_ID)
        assert report.jobs == [{"job_id": "job-1", "dataset": "telco"}]
        assert [c["purpose"] for c in report.consents] == [PURPOSE]
        assert report.personal_data == {"subject_id": RAW_ID, "email": EMAIL}
        assert report.to_dict()["partner_registries"][0]["subject"] == own.pseudonym(RAW_ID)
        with pytest.raises(LedgerError, match="needs the subject's id, not a pseudonym"):
            SubjectRequests(home, registries=[partner]).erase(own.pseudonym(RAW_ID))

        other = SubjectRequests(home).erase("5575-GNVDE")  # without the registry
        assert other.models_flagged == [] and other.untraceable_models == ["job-1/model"]
        assert "partner's own registry, which was not searched" in other.note

        erased = SubjectRequests(home, registries=[partner]).erase(RAW_ID)
        assert erased.models_flagged == ["job-1/model"] and erased.untraceable_models == []
        assert erased.consents_withdrawn == [PURPOSE] and erased.keys_destroyed >= 1
        assert [e.job_id for e in home.events(event_type=EventType.MODEL_FLAGGED)] == ["job-1"]
        [there] = partner.events(event_type=EventType.SUBJECT_ERASED)
        assert there.payload["models_flagged"] == ["job-1/model"]
        assert own.allowed([RAW_ID], PURPOSE).tolist() == [False]
        assert own.subjects.is_erased(own.pseudonym(RAW_ID))
        assert home.verify().ok and partner.verify().ok
