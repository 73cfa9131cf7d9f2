"""Feature layouts: the one thing about a partner's data that leaves its node before training.

- `layout_differences` names, for several partners' layouts, the partner, the column and the value
  that differ (a missing column, a category one declares and another does not, other bounds, another
  order). `fedpact data compare` prints it; the coordinator can use it when layouts differ in a job.
- `format_layout` prints a layout as JSON, one column per line.
- `suggest_declarations` / `render_suggestion`: the `[bounds]` and `[categories]` a mapping still
  lacks, read from the partner's own file on the partner's own machine (`fedpact data check`).
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np

from fedpact.models.datasets import PartnerData, short

RARE_ROWS = 10  # a suggested category held by fewer rows is flagged
MAX_SUGGESTED_CATEGORIES = 100


def _names(names: list[str]) -> str:
    return ", ".join(names)


def _groups(values: dict[str, object]) -> list[tuple[object, list[str]]]:
    """Partners grouped by equal value, groups and partners in first-seen order."""
    groups: dict[object, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    return list(groups.items())


def _number(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _bounds(pair) -> str:
    return f"[{_number(pair[0])}, {_number(pair[1])}]"


def layout_differences(named_layouts: dict[str, dict]) -> list[str]:
    """Every difference between the layouts of several partners, each naming the column, the value
    and which partners have which; [] when all are identical.

    `named_layouts` maps a partner (or mapping) name to a layout as `FeaturePipeline.layout()`
    gives it: {"categorical": {col: [values]}, "numeric": [cols], "bounds": {col: [lo, hi]}}.
    Messages carry no path, line number or statistic: only what the layouts themselves hold.
    """
    names = [str(n) for n in named_layouts]
    if len(names) < 2:
        return []
    layouts = list(named_layouts.values())
    cat = {n: {str(c): [str(v) for v in vs] for c, vs in (lay.get("categorical") or {}).items()}
           for n, lay in zip(names, layouts, strict=True)}
    num = {n: [str(c) for c in lay.get("numeric") or []] for n, lay in zip(names, layouts, strict=True)}
    bnd = {n: {str(c): tuple(float(x) for x in b) for c, b in (lay.get("bounds") or {}).items()}
           for n, lay in zip(names, layouts, strict=True)}
    columns: list[str] = []
    for n in names:
        columns += [c for c in [*cat[n], *num[n]] if c not in columns]

    diffs: list[str] = []
    for col in columns:
        kinds = {n: "categorical" if col in cat[n] else "numeric" if col in num[n] else None
                 for n in names}
        if len(set(kinds.values())) > 1:
            parts = [f"{kind} in {_names(ns)}" if kind else f"absent from {_names(ns)}"
                     for kind, ns in _groups(kinds)]
            diffs.append(f"column {short(col)}: " + "; ".join(parts))
            continue
        if kinds[names[0]] == "categorical":
            lists = {n: cat[n][col] for n in names}
            sets = {n: set(v) for n, v in lists.items()}
            values = list(dict.fromkeys(v for n in names for v in lists[n]))
            differ = False
            for value in values:
                have = [n for n in names if value in sets[n]]
                if len(have) < len(names):
                    differ = True
                    lack = [n for n in names if value not in sets[n]]
                    diffs.append(f"column {short(col)}: category {short(value)} is declared by "
                                 f"{_names(have)} but not by {_names(lack)}")
            if not differ and len({tuple(v) for v in lists.values()}) > 1:
                parts = [f"{_names(ns)}: {', '.join(short(v) for v in vals)}"
                         for vals, ns in _groups({n: tuple(lists[n]) for n in names})]
                diffs.append(f"column {short(col)}: categories in a different order: " + "; ".join(parts))
        else:
            pairs = {n: bnd[n].get(col) for n in names}
            if len(set(pairs.values())) > 1:
                parts = [f"{_bounds(pair)} in {_names(ns)}" if pair else f"no bounds in {_names(ns)}"
                         for pair, ns in _groups(pairs)]
                diffs.append(f"column {short(col)}: bounds differ: " + "; ".join(parts))
    for kind, per in (("categorical", {n: list(cat[n]) for n in names}), ("numeric", num)):
        if len({frozenset(v) for v in per.values()}) == 1 and len({tuple(v) for v in per.values()}) > 1:
            parts = [f"{_names(ns)}: {', '.join(cols)}" for cols, ns in _groups({n: tuple(per[n]) for n in names})]
            diffs.append(f"order of {kind} columns differs: " + "; ".join(parts))
    return diffs


def format_layout(layout: dict) -> str:
    """`layout` as JSON with one column per line (json.loads gives it back unchanged)."""
    def block(key: str, items: dict) -> str:
        if not items:
            return f'  "{key}": {{}}'
        rows = [f"    {json.dumps(c, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                for c, v in items.items()]
        return f'  "{key}": {{\n' + ",\n".join(rows) + "\n  }"

    parts = []
    for key, value in layout.items():
        if isinstance(value, dict):
            parts.append(block(key, value))
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}"


# --------------------------------------------------------------------------- suggestions


def round_outward(low: float, high: float, digits: int = 2) -> tuple[float | int, float | int]:
    """[low, high] widened to `digits` significant figures: low rounded down, high up."""
    def rounded(x: float, up: bool) -> float | int:
        if x == 0:
            return 0
        d = Decimal(repr(float(x)))
        step = Decimal(1).scaleb(d.adjusted() - digits + 1)
        r = (d / step).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR) * step
        return int(r) if r == r.to_integral_value() else float(r)

    lo, hi = rounded(low, False), rounded(high, True)
    if not lo < hi:  # a constant column
        hi = rounded(lo + max(abs(lo) * 0.1, 1), True)
    return lo, hi


def suggest_declarations(data: PartnerData) -> dict:
    """What the mapping still lacks, read from `data` (the partner's own rows): bounds for numeric
    columns without any, categories for categorical columns without any, and the columns whose
    `missing` policy is "median". Never sent anywhere: `fedpact data check` prints it."""
    spec = data.spec
    out: dict = {"bounds": {}, "categories": {}, "rare": {}, "too_many": {}, "median": []}
    for col in spec.numeric:
        if col in spec.bounds:
            continue
        values = data.features[col].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            out["bounds"][col] = list(round_outward(float(values.min()), float(values.max())))
    for col in spec.categorical:
        if spec.categories.get(col):
            continue
        counts = data.features[col][data.features[col] != ""].value_counts()
        if len(counts) > MAX_SUGGESTED_CATEGORIES:
            out["too_many"][col] = len(counts)
            continue
        out["categories"][col] = sorted(counts.index)
        rare = sorted(v for v, c in counts.items() if c < RARE_ROWS)
        if rare:
            out["rare"][col] = rare
    out["median"] = [c for c, p in spec.missing.items() if p == "median"]
    return out


def _key(col: str) -> str:
    return col if re.fullmatch(r"[A-Za-z0-9_-]+", col) else json.dumps(col)


def render_suggestion(suggestion: dict, rows: int) -> str:
    """The suggestion as TOML lines to add to a mapping, with comments saying where they come
    from; "" when nothing is to be declared."""
    if not any(suggestion[k] for k in ("bounds", "categories", "too_many", "median")):
        return ""
    lines = [
        f"# Suggested settings, computed from your file ({rows:,} rows) on this machine; nothing was sent.",
        "# from your file — prefer your domain's ranges; rounded outward (2 significant figures).",
        "# Declared values become part of the layout every partner sees: a range or a rare category",
        "# read from your rows tells them something about your customers, and every partner must",
        "# declare the same lists in the same order. Add the lines to the bounds and categories",
        "# tables of your mapping (one table of each).",
    ]
    if suggestion["bounds"]:
        lines += ["[bounds]"] + [f"{_key(c)} = {_bounds(b)}" for c, b in suggestion["bounds"].items()]
    if suggestion["categories"] or suggestion["too_many"]:
        lines += ["", "[categories]"]
        for col, values in suggestion["categories"].items():
            rare = suggestion["rare"].get(col)
            if rare:
                lines.append(f"# {col}: {', '.join(short(v) for v in rare[:10])}"
                             f"{', …' if len(rare) > 10 else ''} occur in fewer than {RARE_ROWS} rows")
            lines.append(f"{_key(col)} = {json.dumps(values, ensure_ascii=False)}")
        for col, count in suggestion["too_many"].items():
            lines.append(f"# {col}: {count:,} distinct values: is it really categorical? (an id or "
                         "free text must not be a feature; list the values you mean to keep)")
    for col in suggestion["median"]:
        lines.append(f"# missing.{col} = \"median\" is refused in a job: choose \"zero\" or \"drop\"")
    return "\n".join(lines)

