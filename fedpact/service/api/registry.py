"""Model registry and delivery: versioned models with a model card, plots, export and scoring.

Each finished job becomes `NAME@VERSION` under `HOME/registry/NAME/VERSION/`:

- `model.pt` — the job's weights and feature layout (copied from the job folder);
- `card.json` — the model card (task, partners and rows, features, pooled ROC-AUC / PR-AUC /
  top-decile lift / calibration, ε/δ spent with the dp-accounting cross-check, membership-attack
  AUC, and the ids of the ledger events of its lineage); its SHA-256 is in `model.delivered`;
- `roc.png`, `gains.png`, `calibration.png` — drawn from the pooled score histograms;
- `model.torchscript.pt`, `model.onnx` — the scoring model (fedpact.models.export): input = raw
  numeric values (float64, layout order) and category codes (int64, -1 = not declared); the
  training layout's encoding and the calibration correction inside; output = calibrated
  probability; the contract (`fedpact.json`), layout and card inside (extra files / metadata).

Curves and calibration come from the pooled 1,000-bin score histograms of all partners' held-out
rows (the same figures the coordinator already receives each round; see docs/privacy.md), never
from rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedpact.audit import EventType, Ledger
from fedpact.audit.records import NO_PRIVACY_GUARANTEE, secure_aggregation_ran
from fedpact.errors import FedpactError
from fedpact.federation.coordinator import JobResult
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import BUILTIN_SPECS, DatasetSpec, PartnerData
from fedpact.models.export import (
    ExportedModel,
    ExportError,
    export_onnx,
    load_exported,
    n_inputs,
    torchscript_to_onnx,
)
from fedpact.models.export import export_torchscript as _export_torchscript
from fedpact.models.export import load_network as _load_network
from fedpact.models.metrics import metrics_from_histograms
from fedpact.models.scoring import (
    Calibration,
    ScoringMismatch,
    calibration_summary,
    fit_calibration,
)
from fedpact.models.scoring import read_scoring_rows as _read_scoring_rows
from fedpact.models.scoring import score_rows as _score_rows

from .store import ServiceStore, _finite, dumps, models

PLOTS = ("roc", "gains", "calibration")
CALIBRATION_BINS = 10


class RegistryError(FedpactError):
    """A model reference, export or scoring request cannot be served; the message says why."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`NAME@VERSION` or `NAME` (latest)."""
    name, _, version = (ref or "").partition("@")
    if not name:
        raise RegistryError(f"model reference {ref!r}: expected NAME or NAME@VERSION", 422)
    if version:
        if not version.lstrip("v").isdigit():
            raise RegistryError(f"model reference {ref!r}: the version must be a number", 422)
        return name, int(version.lstrip("v"))
    return name, None


# --------------------------------------------------------------------------- curves from histograms


@dataclass
class PooledScores:
    """The partners' released held-out score histograms, summed (noisy counts clipped at 0:
    post-processing, no extra ε), over the bins `edges` (probabilities, 0 and 1 at the ends)."""

    pos: np.ndarray
    neg: np.ndarray
    sq_error: float
    source: str
    edges: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.pos = np.clip(np.asarray(self.pos, float), 0, None)
        self.neg = np.clip(np.asarray(self.neg, float), 0, None)
        if self.edges is None:
            self.edges = np.linspace(0.0, 1.0, len(self.pos) + 1)
        self.edges = np.asarray(self.edges, float)

    @property
    def bins(self) -> int:
        return len(self.pos)

    @property
    def centres(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    def metrics(self) -> dict:
        return metrics_from_histograms(self.pos, self.neg, self.sq_error)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) at each bin threshold, from the highest score down."""
        p, q = self.pos[::-1], self.neg[::-1]
        tpr = np.concatenate([[0.0], np.cumsum(p) / max(p.sum(), 1)])
        fpr = np.concatenate([[0.0], np.cumsum(q) / max(q.sum(), 1)])
        return fpr, tpr

    def gains(self) -> tuple[np.ndarray, np.ndarray]:
        """(share of customers targeted, share of all positives captured), best scores first."""
        p, q = self.pos[::-1], self.neg[::-1]
        n = p.sum() + q.sum()
        targeted = np.concatenate([[0.0], np.cumsum(p + q) / max(n, 1)])
        captured = np.concatenate([[0.0], np.cumsum(p) / max(p.sum(), 1)])
        return targeted, captured

    def calibration(self, groups: int = CALIBRATION_BINS) -> dict:
        """Reliability table, one row per released bin (the finest grouping the release allows;
        more than `groups` bins are merged into `groups` groups of adjacent bins), and the
        expected calibration error. Within a bin the mean score is taken as the bin centre."""
        cuts = np.linspace(0, self.bins, min(groups, self.bins) + 1).astype(int)
        centres = self.centres
        n = float(self.pos.sum() + self.neg.sum())
        rows, ece = [], 0.0
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            pos, neg = self.pos[lo:hi], self.neg[lo:hi]
            count = pos.sum() + neg.sum()
            low, high = float(self.edges[lo]), float(self.edges[hi])
            if count <= 0:
                rows.append({"lo": low, "hi": high, "rows": 0, "predicted": None, "observed": None})
                continue
            predicted = float(((pos + neg) * centres[lo:hi]).sum() / count)
            observed = float(pos.sum() / count)
            ece += count / n * abs(predicted - observed)
            rows.append({"lo": low, "hi": high, "rows": int(round(count)),
                         "predicted": predicted, "observed": observed})
        return {"expected_calibration_error": ece, "brier": self.sq_error / n if n else None,
                "bins": rows}


def pooled_scores(job: JobConfig, result: JobResult, ledger: Ledger) -> PooledScores:
    """The final pooled histograms of `result`: what the partners released in the job's last
    evaluation (DP histograms when the job had DP), summed by the coordinator. Nothing is
    re-scored on the partners' rows for the card."""
    hist = getattr(result, "histograms", None) or result.to_dict().get("histograms")
    if hist:
        return PooledScores(np.asarray(hist["pos"], float), np.asarray(hist["neg"], float),
                            float(hist["sq_error"]),
                            "released (DP) held-out histograms" if hist.get("dp") else
                            "released held-out histograms (no DP)", hist.get("edges"))
    # No fallback that re-scores the partners' rows: that would be a release outside the
    # privacy account. A result without its released histograms gets no curves.
    raise RegistryError(f"job {job.job_id}: the result carries no released score histograms "
                        "(a job from before they were kept); it cannot be registered with curves", 409)


# --------------------------------------------------------------------------- plots


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def draw_plots(scores: PooledScores, title: str) -> dict[str, bytes]:
    """ROC, cumulative gains with lift, and a reliability diagram, as PNG bytes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    m = scores.metrics()
    out = {}

    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    fpr, tpr = scores.roc()
    ax.plot(fpr, tpr, color="#1f5fa8", lw=2, label=f"federated model (AUC {m['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC — {title}")
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = _figure_png(fig)

    fig = Figure(figsize=(9, 4))
    ax1, ax2 = fig.subplots(1, 2)
    targeted, captured = scores.gains()
    ax1.plot(targeted, captured, color="#1f5fa8", lw=2, label="federated model")
    ax1.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="random targeting")
    ax1.set(xlabel="share of customers targeted (best scores first)",
            ylabel="share of all positives captured", xlim=(0, 1), ylim=(0, 1.01),
            title="cumulative gains")
    ax1.legend(loc="lower right", fontsize=8)
    keep = targeted > 0.01
    ax2.plot(targeted[keep], captured[keep] / targeted[keep], color="#c0562b", lw=2)
    ax2.axhline(1.0, color="#999", ls="--", lw=1)
    ax2.axvline(0.1, color="#bbb", ls=":", lw=1)
    ax2.set(xlabel="share of customers targeted", ylabel="cumulative lift", xlim=(0, 1),
            title=f"lift (top decile {m['lift_at_10']:.2f})")
    fig.suptitle(title, fontsize=10)
    out["gains"] = _figure_png(fig)

    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    cal = scores.calibration()
    pts = [(b["predicted"], b["observed"], b["rows"]) for b in cal["bins"] if b["rows"]]
    if pts:
        px, py, pn = zip(*pts, strict=True)
        ax.plot(px, py, marker="o", color="#1f5fa8", lw=2, label="federated model")
        for x, y, n in pts:
            ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color="#555")
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="perfectly calibrated")
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", xlim=(0, 1),
           ylim=(0, 1), title=f"calibration (ECE {cal['expected_calibration_error']:.3f}, "
                               f"Brier {m['brier']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    out["calibration"] = _figure_png(fig)
    return out


# --------------------------------------------------------------------------- export and scoring
# The logic lives in fedpact.models.export (TorchScript / ONNX with the layout's encoding and the
# calibration inside) and fedpact.models.scoring (reading rows, scoring, calibration fitting).

Scorer = ExportedModel
EXPORT_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
DataFileMismatch = ScoringMismatch
SCORING_NOTE = ("fedpact model score NAME@VERSION input.csv --mapping map.toml: validated like "
                "training data, the label column ignored; the exported model encodes each row "
                "with the training layout (declared categories, numbers clipped to their bounds "
                "and scaled) and applies the calibration correction, so a row's score never "
                "depends on the other rows scored with it")


def load_network(model_path: Path) -> tuple[torch.nn.Module, dict]:
    net, _kind, layout = _load_network(model_path)
    return net, layout


def export_torchscript(model_path: Path, out: Path, card: dict,
                       calibration: Calibration | None = None) -> dict:
    """The TorchScript scoring model (models.export); its input contract."""
    try:
        return _export_torchscript(model_path, out, card=card, calibration=calibration)
    except ExportError as exc:
        raise RegistryError(str(exc), 409) from None


def load_torchscript(path: Path) -> ExportedModel:
    """A fedpact export, TorchScript or ONNX (the file's content decides)."""
    try:
        return load_exported(path)
    except ExportError as exc:
        raise RegistryError(str(exc), 422) from None


def read_scoring_rows(csv_path: str | Path, mapping_path: str | Path | DatasetSpec,
                      layout: dict | None = None) -> PartnerData:
    """Rows to score (models.scoring.read_scoring_rows): training validation, label ignored."""
    return _read_scoring_rows(csv_path, mapping_path, layout)


def score_rows(scorer: ExportedModel, data: PartnerData) -> tuple[pd.DataFrame, list[str]]:
    """Scores of validated rows with the model's embedded encoding (no statistic of the batch)."""
    return _score_rows(scorer, data)


def calibration_fields(scores: PooledScores, edges=None) -> tuple[Calibration, dict]:
    """The calibration correction fitted on the pooled held-out histograms and the model card's
    `calibration_correction` entry: the fit and the error before and after, from the same
    histograms. `edges`: the bins' score edges (default: the scores' own, else equal-width bins
    over [0, 1]). Post-processing of the released histograms: no extra ε."""
    if edges is None:
        edges = getattr(scores, "edges", None)
    if edges is not None and len(edges) != scores.bins + 1:
        edges = None
    bins = np.asarray(edges, dtype=float) if edges is not None else scores.bins
    calibration = fit_calibration(scores.pos, scores.neg, bins)
    before = calibration_summary(scores.pos, scores.neg, bins)
    after = calibration_summary(scores.pos, scores.neg, bins, calibration=calibration)
    return calibration, {
        **calibration.to_dict(),
        "fitted_on": f"pooled held-out score histograms ({scores.bins} bins, {scores.source}; "
                     "counts clipped at 0, each bin at its centre)",
        "epsilon_cost": 0.0,
        "privacy": "post-processing of the already released histograms: no extra ε",
        "applied_in": ["model.torchscript.pt", "model.onnx"],
        "before": before, "after": after,
        "evaluated_on": "the same histograms (in-sample: two parameters fitted on them)",
    }


# --------------------------------------------------------------------------- the registry


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class ModelRegistry:
    """Versioned models of finished jobs, indexed in the service DB, files under HOME/registry."""

    def __init__(self, store: ServiceStore, ledger: Ledger):
        self.store = store
        self.ledger = ledger
        self.root = store.home / "registry"
        # One registration at a time (version numbers); the service DB's write lock is taken only
        # for the inserts, so requests are not held up while plots and the export are built.
        self._lock = threading.Lock()

    def folder(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def register(self, job: JobConfig, result: JobResult, *, name: str, requested_by: str,
                 partners: list[str]) -> int:
        """Build the card, plots and export of a finished job and record its delivery; the version."""
        from sqlalchemy import func, insert, select, update

        scores = pooled_scores(job, result, self.ledger)
        with self._lock:
            with self.store.engine.connect() as conn:
                latest = conn.execute(select(func.max(models.c.version))
                                      .where(models.c.name == name)).scalar()
            version = int(latest or 0) + 1
            folder = self.folder(name, version)
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            shutil.copyfile(result.model_path, folder / "model.pt")
            card = self._card(job, result, scores, name, version, requested_by, partners)
            released = getattr(result, "histograms", None) or {}
            calibration, card["calibration_correction"] = calibration_fields(scores, released.get("edges"))
            for kind, png in draw_plots(scores, f"{name}@{version}").items():
                (folder / f"{kind}.png").write_bytes(png)
            contract = export_torchscript(folder / "model.pt", folder / "model.torchscript.pt", card,
                                          calibration)
            card["export"] = {k: v for k, v in contract.items() if k != "layout"}
            try:
                export_onnx(folder / "model.pt", folder / "model.onnx", card=card, calibration=calibration)
            except ExportError as exc:
                raise RegistryError(str(exc), 409) from None
            text = json.dumps(_finite(card), indent=1)
            (folder / "card.json").write_text(text)
            digest = hashlib.sha256(text.encode()).hexdigest()
            with self.store.write_lock, self.store.engine.begin() as conn:
                conn.execute(insert(models).values(
                    name=name, version=version, job_id=job.job_id, folder=str(folder),
                    card=dumps(card), card_sha256=digest, created_at=self.store.now()))
        event = self.ledger.append(
            EventType.MODEL_DELIVERED,
            {"model": f"{name}@{version}", "recipient": requested_by, "card_sha256": digest,
             "format": "state_dict+torchscript+onnx", "purpose": job.purpose, "partners": partners},
            actor="coordinator", job_id=job.job_id)
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(update(models).where((models.c.name == name) & (models.c.version == version))
                         .values(delivery_event_id=event.event_id))
        return version

    def _card(self, job: JobConfig, result: JobResult, scores: PooledScores, name: str, version: int,
              requested_by: str, partners: list[str]) -> dict:
        spec = BUILTIN_SPECS.get(job.dataset)
        lineage: dict[str, list[str]] = {}
        events = self.ledger.events(job_id=job.job_id)
        for ev in events:
            lineage.setdefault(ev.event_type, []).append(ev.event_id)
        created = [ev.payload.get("config") or {} for ev in events
                   if ev.event_type == EventType.JOB_CREATED.value]
        # what the job's events show ran, never the setting alone (None: no event records it)
        secure_aggregation = secure_aggregation_ran(
            events, created[0] if created else {"secure_aggregation": job.secure_aggregation})
        pooled = scores.metrics()
        final = {k: v for k, v in result.final.items() if k != "round"}
        return {
            "model": f"{name}@{version}", "name": name, "version": version,
            "created_at": _iso(self.store.now()), "job_id": job.job_id,
            "task": spec.task if spec and not job.own_data else (job.task or None),
            "dataset": spec.name if spec and not job.own_data else job.dataset,
            "partitioning": job.partitioning, "purpose": job.purpose, "requested_by": requested_by,
            "model_kind": job.model, "rounds": job.rounds, "local_epochs": job.local_epochs,
            "partners": [{"dataset": p.name, "train_rows": p.train_rows, "test_rows": p.test_rows,
                          "epsilon": p.epsilon, "noise_multiplier": p.noise_multiplier,
                          "membership_auc": p.membership_auc} for p in result.partners],
            "features": {"categorical": result.layout.get("categorical", {}),
                         "numeric": result.layout.get("numeric", []),
                         "input_width": n_inputs(result.layout) if result.layout else None},
            "metrics": {"evaluated_on": "pooled held-out rows of all partners "
                                        f"({int(final.get('n', 0))} rows)",
                        "roc_auc": final.get("roc_auc"), "pr_auc": final.get("pr_auc"),
                        "lift_at_10": final.get("lift_at_10"), "brier": final.get("brier"),
                        "positive_rate": final.get("positive_rate"), "n": final.get("n"),
                        "from_histograms": {k: pooled[k] for k in ("roc_auc", "pr_auc", "lift_at_10")}},
            "calibration": scores.calibration(),
            "curves_source": f"pooled {scores.bins}-bin score histograms ({scores.source})",
            "privacy": {
                "dp": job.dp, "unit": "one row of a partner dataset",
                "guarantee": _guarantee(job, result),
                "target_epsilon": job.target_epsilon if job.dp else None,
                "target_delta": job.target_delta if job.dp else None,
                "epsilon_spent": result.epsilon if job.dp else None,
                "delta": result.delta if job.dp else None,
                "accountant": job.accountant, "max_grad_norm": job.max_grad_norm,
                "per_partner": {p.name: {"epsilon_opacus_rdp": p.epsilon,
                                         "epsilon_dp_accounting_rdp": p.epsilon_google_rdp,
                                         "epsilon_dp_accounting_pld": p.epsilon_google_pld,
                                         "noise_multiplier": p.noise_multiplier,
                                         "sample_rate": p.sample_rate, "steps": p.steps}
                                for p in result.partners} if job.dp else {},
                "central_dp": result.central_dp or None,
                "secure_aggregation": secure_aggregation,
                "secure_aggregation_requested": job.secure_aggregation,
            },
            "membership_inference": {
                "attack": "loss-threshold (Yeom et al. 2018) on each partner's train vs held-out rows",
                "auc_max": result.membership_auc,
                "per_partner": {p.name: p.membership_auc for p in result.partners},
                "reading": "0.5 = the attack does no better than chance; a smoke alarm, not a proof",
            },
            "history": [{"round": r.get("round"), "roc_auc": r.get("roc_auc"),
                         "epsilon": r.get("epsilon")} for r in result.rounds],
            "lineage": {"ledger_events": lineage,
                        "note": "ids of this job's ledger events; model.delivered follows the card"},
            "files": {"weights": "model.pt", "torchscript": "model.torchscript.pt",
                      "onnx": "model.onnx", "plots": [f"{k}.png" for k in PLOTS]},
            "scoring": SCORING_NOTE,
            "consortium": partners,
        }

    # ---- reading

    def list(self) -> list[dict]:
        from sqlalchemy import select

        with self.store.engine.connect() as conn:
            rows = conn.execute(select(models).order_by(models.c.name, models.c.version)).all()
        return [self._summary(r) for r in rows]

    def _summary(self, row) -> dict:
        card = json.loads(row.card)
        return {"model": f"{row.name}@{row.version}", "name": row.name, "version": row.version,
                "job_id": row.job_id, "task": card.get("task"), "dataset": card.get("dataset"),
                "partners": card.get("consortium", []), "roc_auc": card["metrics"].get("roc_auc"),
                "epsilon_spent": card["privacy"].get("epsilon_spent"),
                "dp": bool(card["privacy"].get("dp")),
                "privacy": card["privacy"].get("guarantee") or (
                    NO_PRIVACY_GUARANTEE if not card["privacy"].get("dp") else
                    f"differentially private, ε spent {card['privacy'].get('epsilon_spent')}"),
                "created_at": row.created_at, "card_sha256": row.card_sha256,
                "delivery_event_id": row.delivery_event_id}

    def get(self, ref: str) -> dict:
        """The registry row of NAME@VERSION (or NAME's latest) with its card."""
        from sqlalchemy import select

        name, version = parse_ref(ref)
        query = select(models).where(models.c.name == name)
        query = (query.where(models.c.version == version) if version is not None
                 else query.order_by(models.c.version.desc()).limit(1))
        with self.store.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise RegistryError(f"no model {ref!r} in the registry", 404)
        return {**self._summary(row), "card": json.loads(row.card), "folder": row.folder}

    def file(self, ref: str, name: str) -> Path:
        entry = self.get(ref)
        path = Path(entry["folder"]) / name
        if not path.is_file():
            raise RegistryError(f"model {entry['model']} has no file {name}", 404)
        return path

    def record_export(self, ref: str, *, recipient: str, actor: str, purpose: str,
                      fmt: str = "torchscript") -> str:
        entry = self.get(ref)
        event = self.ledger.append(
            EventType.MODEL_EXPORTED,
            {"model": entry["model"], "recipient": recipient, "format": fmt, "purpose": purpose},
            actor=actor, job_id=entry["job_id"])
        return event.event_id

    def scorer(self, ref: str) -> Scorer:
        entry = self.get(ref)
        return load_torchscript(Path(entry["folder"]) / "model.torchscript.pt")

    def export_file(self, ref: str, fmt: str = "torchscript") -> tuple[Path, str]:
        """The export of NAME@VERSION in `fmt` ("torchscript" or "onnx") and its download name.
        Models registered before ONNX exports get theirs written from the TorchScript file."""
        if fmt not in EXPORT_FILES:
            raise RegistryError(f"export format {fmt!r}: use one of {', '.join(EXPORT_FILES)}", 422)
        entry = self.get(ref)
        folder = Path(entry["folder"])
        path = folder / EXPORT_FILES[fmt]
        if fmt == "onnx" and not path.is_file() and (folder / EXPORT_FILES["torchscript"]).is_file():
            try:
                torchscript_to_onnx(folder / EXPORT_FILES["torchscript"], path)
            except ExportError as exc:
                raise RegistryError(f"model {entry['model']}: {exc}", 409) from None
        if not path.is_file():
            raise RegistryError(f"model {entry['model']} has no {fmt} export", 404)
        return path, entry["model"].replace("@", "-v") + EXPORT_FILES[fmt].removeprefix("model")


def _guarantee(job: JobConfig, result: JobResult) -> str:
    """The model card's one-line privacy statement: what the run delivered, never ε 0."""
    if not job.dp:
        return NO_PRIVACY_GUARANTEE
    statement = (f"record-level (ε, δ)-differential privacy per partner dataset: ε spent "
                 f"{result.epsilon:.3g}, δ = {job.target_delta}")
    if getattr(result, "private", True) is False:  # the run itself says it was not delivered
        reasons = "; ".join(getattr(result, "not_private_reasons", None) or []) or "see job.finished"
        statement += f" — but the run reports this guarantee was not delivered: {reasons}"
    return statement


__all__ = ["EXPORT_FILES", "DataFileMismatch", "DatasetSpec", "ModelRegistry", "PooledScores",
           "RegistryError", "Scorer", "calibration_fields", "export_torchscript", "load_torchscript",
           "parse_ref", "read_scoring_rows", "score_rows"]
