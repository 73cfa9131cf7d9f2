"""Rich tables for people: a job's result beside its references, ledger events, validation."""

from __future__ import annotations

import math

from rich.table import Table

from fedpact.audit import ChainVerification, LedgerEvent

from .comparison import JobComparison


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def round_status(rnd: int, total: int, entry: dict, *, dp: bool = True) -> str:
    """One line per finished round: the pooled AUC where the round was an evaluation round (the
    others release no metric), and ε spent so far (or the absence of any guarantee)."""
    parts = [f"round {rnd}/{total}"]
    auc = entry.get("roc_auc")
    if isinstance(auc, int | float) and not math.isnan(auc):
        parts.append(f"pooled ROC-AUC {auc:.3f}")
    else:
        parts.append("trained (no evaluation this round)")
    epsilon = entry.get("epsilon")
    if not dp:
        from fedpact.audit.records import NO_PRIVACY_GUARANTEE

        parts.append(NO_PRIVACY_GUARANTEE)
    elif isinstance(epsilon, int | float):
        parts.append(f"ε {epsilon:.3f}")
    return ", ".join(parts)


def comparison_table(cmp: JobComparison, *, title: str) -> Table:
    """Federated model vs partner-alone (same ε), centralised and local references, pooled test rows."""
    job, res, base = cmp.job, cmp.result, cmp.baselines
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("model", "trained on", "ROC-AUC", "PR-AUC", "lift@10%", "Brier", "ε"):
        table.add_column(col, justify="left" if col in ("model", "trained on") else "right")

    def row(name: str, where: str, m: dict, eps: str, bold: bool = False) -> None:
        auc = _fmt(m.get("roc_auc"))
        table.add_row(f"[bold]{name}" if bold else name, where, f"[bold]{auc}" if bold else auc,
                      _fmt(m.get("pr_auc")), _fmt(m.get("lift_at_10"), 2), _fmt(m.get("brier")), eps)

    eps = f"{res.epsilon:.3f}" if job.dp else "∞ (no DP)"
    short = [n.split("/")[-1] for n in cmp.partner_names]
    if cmp.federated_exact:
        row("federated" + (" + DP-SGD" if job.dp else ""),
            f"{len(res.partners)} partners, {job.rounds} rounds", cmp.federated_exact, eps, bold=True)
        row("  as the job released it", "partners' DP score histograms" if job.dp
            else "partners' score histograms", res.final, "in ε" if job.dp else "∞")
    else:
        row("federated" + (" + DP-SGD" if job.dp else ""),
            f"{len(res.partners)} partners, {job.rounds} rounds", res.final, eps, bold=True)
    if base.local_private is not None:
        row("local DP models averaged", f"each partner alone at ε={job.target_epsilon:g}",
            base.local_private.ensemble, f"{job.target_epsilon:g}")
        for name, alone in zip(short, base.local_private.alone, strict=True):
            row(f"  {name} alone, DP", "its own rows", alone, f"{job.target_epsilon:g}")
    table.add_section()
    row("centralised, non-private", "pooled rows (not allowed in reality)", base.centralised, "∞")
    row("local models averaged", "each partner alone, non-private", base.local.ensemble, "∞")
    for name, alone in zip(short, base.local.alone, strict=True):
        row(f"  {name} alone", "its own rows", alone, "∞")
    return table


def partners_table(cmp: JobComparison) -> Table:
    """Each partner's rows, noise, ε (Opacus RDP and the dp-accounting cross-check) and MIA AUC."""
    res = cmp.result
    table = Table(title_justify="left")
    for col in ("partner", "train rows", "test rows", "positive rate", "noise σ", "ε (Opacus RDP)",
                "ε (dp-accounting RDP / PLD)", "membership-attack AUC"):
        table.add_column(col, justify="left" if col == "partner" else "right")
    rates = dict(zip(cmp.partner_names, cmp.partner_positive_rates, strict=True))
    dp = cmp.job.dp
    for p in res.partners:
        table.add_row(p.name, f"{p.train_rows:,}", f"{p.test_rows:,}",
                      f"{rates.get(p.name, float('nan')):.1%}",
                      _fmt(p.noise_multiplier, 2) if dp else "–",
                      _fmt(p.epsilon) if dp else "–",
                      f"{p.epsilon_google_rdp:.3f} / {p.epsilon_google_pld:.3f}" if dp else "–",
                      _fmt(p.membership_auc) if p.membership_auc is not None else "–")
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
