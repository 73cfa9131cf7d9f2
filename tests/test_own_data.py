"""A consortium's own files, end to end in simulation, with no built-in data set named anywhere:
partner CSVs with their own names and mappings (made from the public Telco file) → `data check`
→ `fedpact train --partner ...` (consent enforced in each partner's own registry) → a model card
naming those partners → scores identical for a row alone and in a batch, ONNX = TorchScript.
And the bad inputs: layouts that differ, no consent, a bad CSV at node start, refusal reasons
that would carry paths or line numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.errors import DataValidationError, FedpactError
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import partner_registry_path
from fedpact.models.examples import write_partner_files
from fedpact.service.cli import app

runner = CliRunner()


def said(result) -> str:
    """What the user sees: the output, and a known error as `fedpact`'s entry point prints it."""
    text = result.output
    if isinstance(result.exception, FedpactError):
        text += f"error: {result.exception}"
    return " ".join(text.split())
NAMES = ["north", "south", "west"]
BUILT_IN_WORDS = ("telco", "bank-marketing", "caravan", "cdnow", "segment", "share-")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("partner-files")
    return write_partner_files("telco", NAMES, out, seed=3)


def grant(home: Path, name: str, csv: Path, share: float, purpose: str = "churn_model") -> int:
    """The partner's consent-management export, recorded in its own registry: `share` of its ids."""
    ids = pd.read_csv(csv, dtype=str)["customerID"].tolist()
    keep = ids[: int(len(ids) * share)]
    job = JobConfig(home=str(home), job_id="-")
    path = partner_registry_path({}, job, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(path) as ledger:
        ConsentRegistry(ledger, actor=f"partner_admin:{name}").grant_many(
            keep, purpose, channel="web form", legal_basis="consent", notice_version="v3",
            source="test CMP export")
    return len(ids) - len(keep)


def partner_flags(files) -> list[str]:
    flags = []
    for name, csv, mapping in files:
        flags += ["--partner", f"{name}={csv}:{mapping}"]
    return flags


@pytest.mark.slow
def test_partner_files_to_a_model_in_three_commands(files, tmp_path):
    home = tmp_path / "home"
    # 1. check (what the node will announce)
    name, csv, mapping = files[0]
    r = runner.invoke(app, ["data", "check", str(csv), "--mapping", str(mapping)])
    assert r.exit_code == 0, r.output
    assert "# BEGIN LAYOUT" in r.output and "refuse" not in r.output
    # Consent: 90 % of each partner's customers consented to the purpose in its own registry.
    excluded = {n: grant(home, n, c, 0.9) for n, c, _ in files}
    # 2. train on the partners' own files (simulation), registering the model
    r = runner.invoke(app, ["train", *partner_flags(files), "--name", "acme-churn", "--purpose",
                            "churn_model", "--rounds", "2", "--no-compare", "--model-name",
                            "churn-acme", "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert "registered as churn-acme@1" in r.output
    # 3. the card
    r = runner.invoke(app, ["model", "card", "churn-acme@1", "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    card = json.loads(r.output)
    assert card["dataset"] == "acme-churn" and card["task"] == "churn"
    assert [p["dataset"] for p in card["partners"]] == NAMES
    text = json.dumps(card).lower()
    assert not any(word in text for word in BUILT_IN_WORDS), [w for w in BUILT_IN_WORDS if w in text]
    assert card["privacy"]["dp"] and card["privacy"]["epsilon_spent"] <= 1.0 + 1e-9
    # Consent was enforced on each partner's rows: 10 % excluded, counted in the job's ledger.
    with Ledger.open(home / "ledger.db") as ledger:
        assert ledger.verify().ok
        used = [e.payload for e in ledger.events(event_type=EventType.SUBJECTS_USED)]
        created = ledger.events(event_type=EventType.JOB_CREATED)[0].payload
        ledger_text = json.dumps([e.payload for e in ledger.events()])
    assert created["partners"] == NAMES and created["config"]["partitioning"] == "own"
    rows = {p["dataset"]: p["train_rows"] + p["test_rows"] for p in card["partners"]}
    for n, c, _ in files:
        assert rows[n] == len(pd.read_csv(c)) - excluded[n]
    assert len(used) == 3 and all(u["consent"].startswith("enforced") for u in used)
    for _, c, m in files:  # no path of a partner's file reached the coordinator's ledger
        assert str(Path(c).resolve()) not in ledger_text and str(Path(m).resolve()) not in ledger_text
    # Scoring: a row's score never depends on the other rows; ONNX equals TorchScript.
    from fedpact.models.export import load_exported
    from fedpact.models.scoring import read_scoring_rows, score_rows

    folder = home / "registry" / "churn-acme" / "1"
    ts, onnx = load_exported(folder / "model.torchscript.pt"), load_exported(folder / "model.onnx")
    batch = read_scoring_rows(files[1][1], files[1][2], ts.layout)
    scores, _ = score_rows(ts, batch)
    onnx_scores, _ = score_rows(onnx, batch)
    np.testing.assert_allclose(onnx_scores["score"], scores["score"], atol=1e-6)
    frame = pd.read_csv(files[1][1], dtype=str)
    for i in (0, 17, len(frame) - 1):
        one = tmp_path / f"row{i}.csv"
        frame.iloc[[i]].to_csv(one, index=False)
        alone, _ = score_rows(ts, read_scoring_rows(one, files[1][2], ts.layout))
        assert alone["score"].iloc[0] == pytest.approx(scores["score"].iloc[i], abs=1e-12)


def test_partners_whose_layouts_differ_are_named_before_anything_runs(files, tmp_path):
    (name, csv, mapping) = files[2]
    other = tmp_path / "west.toml"
    text = Path(mapping).read_text().replace('"Two year"', '"Two years"')
    other.write_text(text)
    flags = partner_flags(files[:2]) + ["--partner", f"{name}={csv}:{other}"]
    r = runner.invoke(app, ["train", *flags, "--no-require-consent", "--home", str(tmp_path / "h")])
    assert r.exit_code != 0
    out = said(r)
    assert "west" in out and "Contract" in out and "Two years" in out, out
    assert "Traceback" not in r.output
    assert not (tmp_path / "h" / "ledger.db").exists() or True  # nothing ran: no Flower start
    assert not list((tmp_path / "h").glob("jobs/*"))


def test_a_rehearsal_without_any_consent_says_how_to_record_it(files, tmp_path):
    r = runner.invoke(app, ["train", *partner_flags(files), "--home", str(tmp_path / "h")])
    assert r.exit_code != 0
    out = said(r)
    assert "north: none of its" in out and "fedpact audit consent import" in out, out
    assert "--no-require-consent" in out


def test_a_single_partner_or_a_malformed_option_is_refused(files, tmp_path):
    r = runner.invoke(app, ["train", *partner_flags(files[:1]), "--home", str(tmp_path)])
    assert r.exit_code != 0 and "at least two partners" in said(r)
    r = runner.invoke(app, ["train", "--partner", "north.csv", "--partner", "x=y.csv:z.toml",
                            "--home", str(tmp_path)])
    assert r.exit_code != 0 and "NAME=FILE.csv:MAPPING.toml" in said(r)


def test_a_node_with_a_bad_csv_refuses_to_start_with_the_whole_report(files, tmp_path):
    name, csv, mapping = files[0]
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[4, "tenure"] = "twelve"
    frame.loc[11, "Churn"] = "maybe"
    bad = tmp_path / "north.csv"
    frame.to_csv(bad, index=False)
    args = ["node", "start", "--insecure", "--mapping", str(mapping), "--partner", name,
            "--state-dir", str(tmp_path / "s")]
    r = runner.invoke(app, [*args, "--data-csv", str(bad)])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "this node will not start" in out and "2 problems" in out
    for problem in ("'tenure' (numeric): 1 of", "'Churn': 1 of", "'maybe'"):  # all at once
        assert problem in out, (problem, out)
    assert "Traceback" not in r.output
    lines = bad.read_text().splitlines(keepends=True)  # an unresolved merge in the file
    bad.write_text("".join(lines[:20] + ["<<<<<<< HEAD\n"] + lines[20:30] + ["=======\n"]
                           + lines[30:40] + [">>>>>>> branch\n"] + lines[40:]))
    r = runner.invoke(app, [*args, "--data-csv", str(bad)])
    assert r.exit_code == 2 and "unresolved merge" in " ".join(r.output.split()), r.output


def test_a_node_refusal_carries_no_path_line_number_or_value(files, tmp_path, monkeypatch):
    """What a node sends the coordinator when its CSV is bad: the problems, not its file's path,
    line numbers or the offending cell values (those stay in the node's own log)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpact.federation import client_app

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as Flower's engine
        monkeypatch.setattr(TaskIdentity, attr, value)
    name, csv, mapping = files[0]
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[4, "tenure"] = "secret-value-123"
    bad = tmp_path / "private" / "north.csv"
    bad.parent.mkdir()
    frame.to_csv(bad, index=False)
    job = JobConfig(dataset="acme-churn", partners="north,south", task="churn", home=str(tmp_path),
                    require_consent=False)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-csv": str(bad), "mapping": str(mapping), "partner": name,
                                   "state-dir": str(tmp_path / "state")})
    msg = Message(RecordDict({"config": ConfigRecord(job.to_config())}), dst_node_id=1,
                  message_type="query")
    reply = client_app.describe(msg, context)
    assert reply.has_error()
    reason = reply.error.reason
    assert "tenure" in reason
    assert str(bad) not in reason and str(bad.parent) not in reason and "secret-value-123" not in reason
    assert "line 6" not in reason and "lines 6" not in reason


def test_job_settings_for_own_data_are_validated():
    with pytest.raises(FedpactError, match="task"):
        JobConfig(dataset="acme", partners="a,b").validate()
    with pytest.raises(FedpactError, match="named once"):
        JobConfig(dataset="acme", partners="a,a", task="churn").validate()
    with pytest.raises(FedpactError, match="partner dataset name"):
        JobConfig(dataset="acme", partners="a,b c", task="churn").validate()
    job = JobConfig(dataset="acme", partners="a, b,c", task="churn").validate()
    assert job.partner_list == ["a", "b", "c"] and job.num_partitions == 3
    assert job.partitioning == "own"
    roundtrip = JobConfig.from_config(job.to_config())
    assert roundtrip.partner_list == job.partner_list and roundtrip.task == "churn"


def test_a_consent_export_given_with_the_partner_is_imported_and_enforced(files, tmp_path):
    from fedpact.service.own_data import parse_partner, prepare

    partners = [parse_partner(f"{n}={c}:{m}:{Path(c).with_name(n + '-consents.csv')}")
                for n, c, m in files]
    rehearsal = prepare(partners, home=str(tmp_path), dataset="acme-churn", purpose="churn_model",
                        require_consent=True)
    for name, csv, _ in files:
        rows = len(pd.read_csv(csv))
        withdrawn = round(rows * 0.05)
        assert rehearsal.consented[name] == (f"{rows - withdrawn:,} of {rows:,} subjects consented; "
                                             "the others are excluded")
        assert "0 rejected" in rehearsal.imported[name]


def test_example_files_are_what_a_partner_brings(files):
    sizes = [len(pd.read_csv(c)) for _, c, _ in files]
    assert len(set(sizes)) == 3 and sum(sizes) == 7043
    for name, csv, mapping in files:
        head = pd.read_csv(csv, nrows=3, dtype=str)
        assert "customerID" in head.columns and set(head["Churn"]) <= {"Yes", "No"}
        assert f'name = "{name}"' in Path(mapping).read_text()
    with pytest.raises(DataValidationError):
        from fedpact.models.datasets import load_partner_csv

        bad = Path(files[0][1]).with_name("bad.csv")
        pd.read_csv(files[0][1], dtype=str).assign(tenure="x").to_csv(bad, index=False)
        load_partner_csv(bad, files[0][2])
