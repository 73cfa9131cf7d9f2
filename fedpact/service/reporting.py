"""Rich tables for people: a job's result beside its references, ledger events, validation."""

from __future__ import annotations

import math

from rich.table import Table

from fedpact.audit import ChainVerification, LedgerEvent

from .comparison import JobComparison


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_table(cmp: JobComparison, *, title: str) -> Table:
    """Federated-DP model vs centralised, partner-alone and averaged-local models on pooled test rows."""
    job, res, base = cmp.job, cmp.result, cmp.baselines
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("model", "trained on", "ROC-AUC", "PR-AUC", "lift@10%", "Brier", "ε"):
        table.add_column(col, justify="left" if col in ("model", "trained on") else "right")
    fed = res.final
    eps = f"{res.epsilon:.3f}" if job.dp else "∞ (no DP)"
    table.add_row("[bold]federated" + (" + DP-SGD" if job.dp else ""),
                  f"{len(res.partners)} partners, {job.rounds} rounds",
                  f"[bold]{_fmt(fed.get('roc_auc'))}", _fmt(fed.get("pr_auc")),
                  _fmt(fed.get("lift_at_10"), 2), _fmt(fed.get("brier")), eps)
    c = base.centralised
    table.add_row("centralised, non-private", "pooled rows (not allowed in reality)",
                  _fmt(c["roc_auc"]), _fmt(c["pr_auc"]), _fmt(c["lift_at_10"], 2), _fmt(c["brier"]), "∞")
    e = base.local_ensemble
    table.add_row("local models averaged", "each partner alone, scores averaged",
                  _fmt(e["roc_auc"]), _fmt(e["pr_auc"]), _fmt(e["lift_at_10"], 2), _fmt(e["brier"]), "∞")
    for name, alone in zip(cmp.partner_names, base.alone, strict=True):
        table.add_row(f"  {name.split('/')[-1]} alone", "its own rows",
                      _fmt(alone["roc_auc"]), _fmt(alone["pr_auc"]), _fmt(alone["lift_at_10"], 2),
                      _fmt(alone["brier"]), "∞")
    return table


def partners_table(cmp: JobComparison) -> Table:
    res = cmp.result
    table = Table(title_justify="left")
    for col in ("partner", "train rows", "test rows", "positive rate", "noise σ", "ε spent"):
        table.add_column(col, justify="left" if col == "partner" else "right")
    rates = dict(zip(cmp.partner_names, cmp.partner_positive_rates, strict=True))
    for p in res.partners:
        table.add_row(p.name, f"{p.train_rows:,}", f"{p.test_rows:,}", f"{rates.get(p.name, float('nan')):.1%}",
                      _fmt(p.noise_multiplier, 2) if cmp.job.dp else "–",
                      _fmt(p.epsilon) if cmp.job.dp else "–")
    return table


def rounds_table(rounds: list[dict]) -> Table:
    table = Table(title_justify="left")
    for col in ("round", "train loss", "pooled ROC-AUC", "PR-AUC", "lift@10%", "ε so far"):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(str(r["round"]), _fmt(r.get("train_loss")), _fmt(r.get("roc_auc")),
                      _fmt(r.get("pr_auc")), _fmt(r.get("lift_at_10"), 2), _fmt(r.get("epsilon")))
    return table


def events_table(events: list[LedgerEvent]) -> Table:
    table = Table(title_justify="left")
    for col in ("seq", "time (UTC)", "type", "actor", "job", "summary", "hash"):
        table.add_column(col, overflow="fold")
    for ev in events:
        summary = ", ".join(f"{k}={v}" for k, v in ev.payload.items()
                            if not isinstance(v, dict | list) and k not in ("config",))
        table.add_row(str(ev.seq), ev.timestamp[:19], ev.event_type, ev.actor, ev.job_id or "",
                      summary[:80], ev.hash[:12] + "…")
    return table


def verification_line(v: ChainVerification) -> str:
    if v.ok:
        return f"[green]✓ chain verified[/green]: {v.events_checked} events, head {v.head_hash[:16]}…"
    return f"[red]✗ chain broken[/red] at event {v.first_bad_seq}: {v.reason}"
