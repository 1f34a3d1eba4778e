"""The summary: every method judged on every concept, as JSON and Markdown tables."""

from __future__ import annotations

from pathlib import Path

from ..._io import write_atomic, write_json
from ...errors import DitlocError
from ...localization import score_mass_k
from ...stats import mean_ci
from .joint import joint_summary, read_joint, streams
from .metrics import method_metrics, oracle_result, paired_regrets, summarize_methods
from .settings import (
    AUTO_K_FRACTION,
    FORMAT,
    HALF,
    MAX_K,
    PAIRED_REFERENCE,
    REGRET_KS,
    SCREEN_DELTA,
    SETTINGS_FILE,
    STRONG_DROP,
    SUMMARY_JSON,
    SUMMARY_MD,
    TIE,
    _read_record,
)
from .store import _presences, _scores_of, read_conditions, read_localizations

# --------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------


def summarize_ground_truth(out, *, threshold: float = HALF) -> dict:
    """Recompute summary.json and summary.md from a run directory's files (no model):
    per concept the search's result and every method's metrics, and per method the
    summary over concepts. Concepts or methods still incomplete are listed as such."""
    out = Path(out)
    record = _read_record(out)
    if record is None:
        raise DitlocError(f"{out} is not a ground-truth directory (no {SETTINGS_FILE}); run `ditloc ground-truth` first")
    try:
        blocks, methods, concepts = list(record["blocks"]), list(record["methods"]), list(record["concepts"])
    except (KeyError, TypeError):
        raise DitlocError(f"{out / SETTINGS_FILE} lacks blocks, methods or concepts; use a new --out directory") from None
    screened: dict = {}
    measured = read_conditions(out, screened)
    localizations = read_localizations(out)
    joint = read_joint(out) if record.get("joint") else None
    rows, per_concept, incomplete = [], [], []
    for c in concepts:
        category, concept = c["category"], c["concept"]
        scores = measured.get((category, concept), {})
        presence = _presences(scores)
        try:
            oracle = oracle_result(presence, blocks, threshold=threshold)
        except DitlocError as e:
            incomplete.append({"category": category, "concept": concept, "missing": str(e)})
            continue
        _, low, high = mean_ci(scores[frozenset()])
        entry = {"category": category, "concept": concept, "n_images": len(scores[frozenset()]),
                 "conditions": len(scores), "screened": sum(1 for k, _ in screened if k == (category, concept)),
                 "baseline_ci": [low, high], "oracle": oracle.to_dict(), "methods": {}}
        if joint is not None:
            entry["joint"] = joint_summary(blocks, oracle, scores[frozenset()], scores,
                                           joint.get((category, concept), {}))
            if entry["joint"] is None:
                incomplete.append({"category": category, "concept": concept, "missing": "joint-attention conditions"})
        for method in methods:
            loc = localizations.get((category, concept, method))
            if loc is None:
                entry["methods"][method] = None
                continue
            try:
                block_scores = _scores_of(loc, blocks, f"{category}/{concept}")
                # the automatic K by the current rule, from the stored scores (the rule can change without a rerun)
                if "sets" in loc:  # a set-level search: its sets, K from its curve
                    m = method_metrics(method, presence, blocks, block_scores, auto_k=loc["auto_k"], oracle=oracle,
                                       threshold=threshold, sets=loc["sets"])
                else:
                    m = method_metrics(method, presence, blocks, block_scores,
                                       auto_k=score_mass_k(loc["scores"], AUTO_K_FRACTION), oracle=oracle,
                                       threshold=threshold)
            except DitlocError as e:
                incomplete.append({"category": category, "concept": concept, "method": method, "missing": str(e)})
                entry["methods"][method] = None
                continue
            entry["methods"][method] = m.to_dict()
            rows.append((oracle, m))
        per_concept.append(entry)
    summary = {
        "format": f"{FORMAT}/summary", "settings": record["settings"], "blocks": blocks, "methods": methods,
        "definitions": {
            "drop": "baseline presence - presence with the set withheld (presence: mean toy-oracle score)",
            "hit_at_1": f"top block's drop within {TIE:g} of the best single block's; the rate is over concepts "
                        f"whose best single block drops presence >= {STRONG_DROP}",
            "regret": "best achievable drop at K - drop of the method's top-K (K=1 best single, K=2 best pair, "
                      "K=4 the best measured 4-block set: the greedy set, the methods' top-4 and the searches' S_4; "
                      "not exhaustive)",
            "spearman": "rank correlation (average ranks) of the method's block scores with the single-block drops",
            "pair_rank": "rank of the method's top-2 pair among all pairs by drop (1 = best)",
            "oracle_k": f"smallest K in 1..{MAX_K} whose best set brings presence below {threshold:g} x baseline; "
                        f"null: > {MAX_K}",
            "auto_k": f"block scores: score_mass_k(scores, {AUTO_K_FRACTION}); search: the smallest K whose S_K "
                      "halves presence on the search's own prompts (SetSearch.k_for_drop(0.5)); matches are counted "
                      "where oracle_k is known",
            "ci": "95% CI by the normal approximation, mean ± 1.96 s/sqrt(n) over images",
            **({"pooled_share": "joint attention: presence with the set's text tokens withheld but the pooled "
                                "vector full - presence with both withheld (the default), paired over the same "
                                "images; > 0: the pooled vector carries that much of the concept past the set",
                "pooled_only": "drop when no block is withheld but every block gets the clean prompt's pooled "
                               "vector"} if joint is not None else {}),
        },
        "concepts": per_concept,
        "incomplete": incomplete,
        "summary": summarize_methods(rows),
        # the set-level search is the reference: the other methods' regrets against it, paired over concepts
        **({"paired": {"reference": PAIRED_REFERENCE, "methods": paired_regrets(per_concept, PAIRED_REFERENCE)}}
           if PAIRED_REFERENCE in methods and len(methods) > 1 else {}),
    }
    write_json(out / SUMMARY_JSON, summary, allow_nan=False)
    write_atomic(out / SUMMARY_MD, summary_markdown(summary))
    return summary


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |"

    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows]


def summary_tables(summary: dict) -> tuple[str, list[tuple[str, str, list[str], list[list[str]]]]]:
    """(intro, [(heading, text, header, rows)]): the search per concept, every method per
    concept, and the per-method summary, as text cells (summary.md and the HTML report)."""
    s = summary["settings"]
    intro = (f"{s['n_images']} held-out images per condition, {s['steps']} steps, blocks searched: "
             f"{', '.join(summary['blocks'])}. Presence: mean toy-oracle score; drop = baseline - presence. "
             "Oracle K: smallest K whose best set (best single, best pair, greedy 3, greedy 4) brings presence "
             f"below half the baseline (– : > {MAX_K}).")
    n_screened = sum(e.get("screened", 0) for e in summary["concepts"])
    if n_screened:
        intro += (f" Screened: {n_screened} of {sum(e['conditions'] for e in summary['concepts'])} conditions (pairs "
                  "and greedy sets that could not be their step's best) were stopped at a screen of their images "
                  f"(`--screen`; each wrongly with probability <= {SCREEN_DELTA}); every best set and every method's set is "
                  "on all images, and a pair rank counts a stopped pair by its screened mean (an unbiased estimate).")
    search = []
    for e in summary["concepts"]:
        o = e["oracle"]
        low, high = e["baseline_ci"]
        search.append([e["category"], e["concept"], f"{_f(o['baseline'])} ({_f(low)}–{_f(high)})",
                       ", ".join(o["best_singles"]), _f(o["best_single_drop"]), ", ".join(o["best_pair"] or []),
                       _f(o["best_pair_drop"]), ", ".join(o["greedy"][-1]), _f(o["greedy_drops"][-1]),
                       _f(o["minimal_k"])])
    methods = []
    for e in summary["concepts"]:
        for method, m in e["methods"].items():
            head = [e["category"], e["concept"], method]
            if m is None:
                methods.append(head + ["(not measured)"])
                continue
            r = m["regret"]
            methods.append(head + [m["top"][0], _f(m["hit_at_1"]), _f(r.get("1")), _f(r.get("2")), _f(r.get("4")),
                                   _f(m["spearman"], 2), f"{_f(m['pair_rank'])}/{m['n_pairs']}", _f(m["auto_k"]),
                                   _f(m["oracle_k"])])
    def ci(v: dict, key: str, digits: int = 3) -> str:
        if v.get(key) is None:
            return f"– ({v['n']})"
        if v.get("low") is None:
            return f"{_f(v[key], digits)} ({v['n']})"
        return f"{_f(v[key], digits)} [{_f(v['low'], digits)}, {_f(v['high'], digits)}] ({v['n']})"

    per_method = []
    for method, v in summary["summary"].items():
        per_method.append(
            [method, str(v["concepts"]), ci(v["hit_at_1"], "rate", 2)]
            + [ci(v[f"regret_{k}"], "mean") for k in REGRET_KS]
            + [ci(v["spearman"], "mean", 2), ci(v["auto_k_match"], "rate", 2), ci(v["auto_k_miss"], "mean_abs", 2)])
    paired = []
    for method, row in summary.get("paired", {}).get("methods", {}).items():
        paired.append([method] + [f"{ci(row[f'regret_{k}'], 'mean')}; {row[f'regret_{k}']['worse']} / "
                                  f"{row[f'regret_{k}']['better']}" for k in REGRET_KS])
    tables = [
        ("The search, per concept", "",
         ["category", "concept", "baseline (95% CI)", "best block", "drop", "best pair", "drop", "greedy 4", "drop",
          "oracle K"], search),
        ("Methods, per concept", "",
         ["category", "concept", "method", "top-1", "hit@1", "regret@1", "regret@2", "regret@4", "spearman",
          "pair rank", "auto K", "oracle K"], methods),
        ("Per method",
         (f"hit@1 over concepts whose best single block drops presence >= {STRONG_DROP}; auto-K match and mean "
          f"|miss| over concepts whose oracle K is <= {MAX_K}; regret@4 against the greedy set. Brackets: 95% "
          "confidence interval over concepts (Wilson for rates, normal approximation for means); (n) concepts."),
         ["method", "concepts", "hit@1 (n)", "regret@1 (n)", "regret@2 (n)", "regret@4 (n)", "spearman (n)",
          "auto-K match (n)", "mean abs miss (n)"], per_method),
    ]
    if paired:
        ref = summary["paired"]["reference"]
        tables.append((
            f"Against `{ref}`, paired over concepts",
            (f"Each method's regret@K minus `{ref}`'s on the same concept: mean [95% CI over concepts] (n); then on "
             f"how many concepts the method's regret is above `{ref}`'s / below it. A CI above 0: `{ref}` is better."),
            ["method"] + [f"regret@{k} - {ref} (n); worse / better" for k in REGRET_KS], paired))
    return intro, tables + joint_tables(summary)


def _ci_cell(v: dict | None) -> str:
    if v is None:
        return "–"
    return f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"


def joint_tables(summary: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The joint-attention tables (models with a pooled text vector): the pooled vector's
    share of each erasure, and where each category lives by stream."""
    entries = [e for e in summary["concepts"] if e.get("joint")]
    if not entries:
        return []
    names = list(streams(summary["blocks"]))
    pooled_rows = []
    for e in entries:
        rows = {r["label"]: r for r in e["joint"]["conditions"]}
        cells = [e["category"], e["concept"], _f(e["oracle"]["baseline"]), _ci_cell(rows["pooled only"]["drop"])]
        for label in ("best pair", "greedy 4", "all blocks"):
            full = rows.get(f"{label}, text only")
            cells.append("–" if full is None else _ci_cell(full["drop"]))
            cells.append("–" if full is None else _ci_cell(full.get("pooled_share")))
        pooled_rows.append(cells)
    header = ["category", "concept", "baseline", "pooled only: drop"]
    for label in ("best pair", "greedy 4", "all blocks"):
        header += [f"{label}, text only: drop", f"{label}: pooled share"]
    tables = [("Joint attention: the pooled vector",
               ("Drop = baseline - presence. *Text only*: the set's text tokens withheld, the pooled vector left full; "
               "the default withholds both. *Pooled share* = presence(text only) - presence(default), paired over the "
               "same images: what the pooled vector alone keeps of the concept once the set's tokens are withheld. "
               "*Pooled only*: no block withheld, every block given the clean prompt's pooled vector. Brackets: 95% "
               f"CI over the {entries[0]['n_images']} images."), header, pooled_rows)]
    if names:
        stream_rows = []
        for e in entries:
            st = e["joint"]["streams"]
            stream_rows.append([e["category"], e["concept"], e["joint"]["best_block_stream"] or "–"]
                               + [f"{_ci_cell(st[n]['all_withheld_drop'])}; max single {st[n]['max_single_drop']:.3f}"
                                  for n in names])
        cats: dict[str, list] = {}
        for e in entries:
            cats.setdefault(e["category"], []).append(e)
        for cat, es in cats.items():
            cells = [cat, f"mean of {len(es)}", ", ".join(sorted({x["joint"]["best_block_stream"] or "–" for x in es}))]
            for n in names:
                cells.append(f"{sum(x['joint']['streams'][n]['all_withheld_drop']['mean'] for x in es) / len(es):+.3f}")
            stream_rows.append(cells)
        tables.append(("Joint attention: which stream holds each concept",
                       ("Drop when every block of one stream is withheld (the default: text tokens and pooled vector), "
                       "95% CI over images, and the largest single-block drop in that stream; then the mean per "
                       "category."), ["category", "concept", "best block's stream"]
                       + [f"all {n}: drop" for n in names], stream_rows))
    return tables


def summary_markdown(summary: dict) -> str:
    """summary.md: the tables of `summary_tables`."""
    intro, tables = summary_tables(summary)
    lines = ["# Localization ground truth (toy world)", "", intro]
    for heading, text, header, rows in tables:
        lines += ["", f"## {heading}", ""] + ([text, ""] if text else []) + _table(header, rows)
    if summary["incomplete"]:
        lines += ["", f"Incomplete (not in the tables): {len(summary['incomplete'])}; rerun the same command to finish."]
    return "\n".join(lines) + "\n"
