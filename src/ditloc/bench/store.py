"""The bench's run directory: its settings file, result stores and merged rows,
and the one reader of a run (`read_run`) that everything outside the bench uses.

A finished unit is one JSON line appended, with flush and fsync, to the
process's store ``results.rank<r>.jsonl``. A line cut short by a kill has no
newline: reading ignores it and the next append cuts it off first. A rerun
reads every store in the run directory, skips the units they hold and does the
rest, so a killed run (even ``kill -9``) loses at most the unit in flight and
never writes one twice. At the end the stores are merged into
``results.jsonl``: one row per line, in plan order.

``bench.json`` records the settings; a rerun with other settings into the same
directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .._io import ResultStore, write_atomic  # noqa: F401  (ResultStore: re-exported)
from ..errors import DitlocError
from .plan import (CONTROLS, DEFAULT_METHOD, FORMAT, BenchPlan, BenchSettings, localization_path, method_controls,
                   slugify)

SETTINGS_FILE = "bench.json"
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class BenchRow:
    """One scored image. Baseline rows have control "baseline", k 0, no blocks and no clean prompt."""

    unit: str
    category: str
    concept: str
    control: str
    k: int
    blocks: tuple[str, ...]
    prompt_index: int
    prompt: str
    clean_prompt: str | None
    seed: int
    eval_text: str
    score: float
    image: str  # PNG path relative to the run directory
    method: str = ""  # top/bottom rows: the localization method that chose the blocks; "" otherwise

    @property
    def ranked_by(self) -> str:
        """The method of a top/bottom row (rows written before methods existed: contribution)."""
        return self.method or (DEFAULT_METHOD if self.control in ("top", "bottom") else "")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BenchRow":
        return cls(**{**d, "blocks": tuple(d["blocks"])})


def current_settings(settings: dict) -> dict:
    """A bench.json's settings in today's names: what runs written before a rename or a new
    setting ran with (their numbers stay comparable, so a rerun resumes them)."""
    settings = dict(settings)
    settings.setdefault("methods", [DEFAULT_METHOD])  # written before localization methods were compared
    if "text_stream" in settings and "adapter_options" not in settings:  # written before --adapter-option
        stream = settings.pop("text_stream")
        settings["adapter_options"] = {"text_stream": stream} if stream else {}
    if "variant" in settings and "contribution_terms" not in settings:  # written before --contribution-terms
        settings["contribution_terms"] = settings.pop("variant")
    if "localize_seed" in settings and "localize_seeds" not in settings:  # written before --localize-seeds
        settings["localize_seeds"] = [settings.pop("localize_seed")]
    return settings


def check_run_dir(out, plan: BenchPlan) -> bool:
    """Refuse a run directory that holds a benchmark with other settings.
    True when it already holds this one (a rerun resumes it)."""
    path = Path(out) / SETTINGS_FILE
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DitlocError(f"cannot read {path}: {e}; use a new --out directory") from None
    new = plan.record()
    settings = current_settings(old.get("settings", {}))
    old["settings"] = settings
    for key, value in BenchSettings.defaults().items():  # settings added since the run was written
        settings.setdefault(key, value)
    if old.get("format") != FORMAT:
        raise DitlocError(f"{path} is not a {FORMAT} settings file; use a new --out directory")
    diffs = [f"{k}: {old['settings'].get(k)!r} there, {v!r} here" for k, v in new["settings"].items()
             if old.get("settings", {}).get(k) != v]
    for key in ("probes_sha256", "concepts"):
        if old.get(key) != new[key]:
            diffs.append(f"{key} differ" if key == "concepts" else "the probe file changed")
    if diffs:
        raise DitlocError(f"{out} holds a benchmark with other settings ({'; '.join(diffs[:3])}); "
                          "rerun with the same settings to resume, or use a new --out directory")
    return True


def write_settings(out, plan: BenchPlan) -> None:
    """bench.json, unless the run directory has it already."""
    if not (Path(out) / SETTINGS_FILE).exists():
        write_atomic(Path(out) / SETTINGS_FILE, json.dumps(plan.record(), indent=1))


def store_path(out, rank: int) -> Path:
    return Path(out) / f"results.rank{rank}.jsonl"


def read_units(out) -> dict[str, dict]:
    """Every finished unit in the run directory's stores (any number of ranks): id -> record."""
    done: dict[str, dict] = {}
    for path in sorted(Path(out).glob("results.rank*.jsonl")):
        for record in ResultStore.read(path):
            done.setdefault(record["unit"], record)
    return done


def collect_rows(plan: BenchPlan, done: dict[str, dict]) -> list[BenchRow]:
    """The rows of the finished generation units, in plan order."""
    rows = []
    for unit in plan.generate_units():
        if unit.id in done:
            rows += [BenchRow.from_dict(r) for r in done[unit.id]["rows"]]
    return rows


def merge_results(out, plan: BenchPlan) -> tuple[list[BenchRow], Path]:
    """Write results.jsonl from the stores (every unit must be finished)."""
    out = Path(out)
    done = read_units(out)
    missing = [u.id for u in plan.units() if u.id not in done]
    if missing:
        raise DitlocError(f"{len(missing)} unit(s) unfinished (first: {missing[0]}); rerun the same command to finish")
    rows = collect_rows(plan, done)
    write_atomic(out / RESULTS_FILE, "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    return rows, out / RESULTS_FILE


# --------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRun:
    """A bench run as read from disk (finished, or partial while it runs): its
    settings record, rows and the concepts' rankings."""

    path: Path
    record: dict  # bench.json
    rows: tuple[BenchRow, ...]
    blocks: tuple[str, ...]  # the model's, from the localizations (empty before the first)
    rankings: dict  # (category, concept) -> block names, best first (the first method's)
    method_rankings: dict = dataclasses.field(default_factory=dict)  # (category, concept, method) -> ranking

    @property
    def settings(self) -> dict:
        return self.record["settings"]

    @property
    def methods(self) -> list[str]:
        """The localization methods compared (runs made before several were compared: contribution)."""
        return list(self.settings.get("methods") or [DEFAULT_METHOD])

    @property
    def categories(self) -> list[str]:
        return list(self.record["concepts"])

    @property
    def ks(self) -> list[int]:
        return list(self.settings["ks"])

    @property
    def n_generation_units(self) -> int:
        n_concepts = sum(len(v) for v in self.record["concepts"].values())
        per_k = sum(1 if control == "random" else sum(control in method_controls(m) for m in self.methods)
                    for control in CONTROLS)
        return n_concepts * (1 + per_k * len(self.ks))

    @property
    def complete(self) -> bool:
        return (self.path / RESULTS_FILE).exists()


def _read_json(path: Path, rerun: str):
    """One JSON document; a damaged or half-written file is one line saying what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DitlocError(f"{path} is damaged ({e}); {rerun}") from None


def _merged_rows(merged: Path) -> list[BenchRow] | None:
    """results.jsonl's rows; None when a line is damaged (the stores hold the same rows)."""
    try:
        lines = merged.read_text(encoding="utf-8").splitlines()
        return [BenchRow.from_dict(json.loads(line)) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _read_rows(out: Path) -> list[BenchRow]:
    """results.jsonl, or while the run is unfinished (or if results.jsonl is damaged) the stores' rows."""
    merged = out / RESULTS_FILE
    if merged.exists():
        rows = _merged_rows(merged)
        if rows is not None:
            return rows
        if not any(out.glob("results.rank*.jsonl")):
            raise DitlocError(f"{merged} is damaged and no result stores are left to rebuild it from; "
                              "rerun `ditloc bench` into a new directory")
    rows = []
    try:
        for record in read_units(out).values():  # tolerates a torn last line
            rows += [BenchRow.from_dict(r) for r in record.get("rows", [])]
    except (KeyError, TypeError) as e:
        raise DitlocError(f"a result store in {out} has a malformed record ({e}); move it away and rerun "
                          "`ditloc bench` with the same command to recompute its units") from None
    return rows


def _ranking(d: dict) -> tuple[str, ...]:
    """A localization file's blocks, best first. A search's: its largest set in the order the blocks
    entered, then the per-block ranking (`Localization.top` of every block), so a forward search's
    top-k prefix is its S_k."""
    ranking = list(d["ranking"])
    if d.get("search"):
        largest = list(d["search"]["sets"][-1])
        ranking = largest + [b for b in ranking if b not in largest]
    return tuple(ranking)


def read_run(run) -> BenchRun:
    """Read a bench run directory (finished, or partial while it runs). A damaged
    results.jsonl is rebuilt in memory from the result stores; other damage is a
    one-line DitlocError."""
    run = Path(run)
    path = run / SETTINGS_FILE
    if not path.is_file():
        raise DitlocError(f"{run} is not a `ditloc bench` run directory (no {SETTINGS_FILE})")
    record = _read_json(path, "restore it, or rerun `ditloc bench` into a new directory")
    if not isinstance(record, dict) or not isinstance(record.get("concepts"), dict) \
            or not isinstance(record.get("settings"), dict):
        raise DitlocError(f"{path} is not a ditloc bench settings file; rerun `ditloc bench` to rewrite it")
    record = {**record, "settings": current_settings(record["settings"])}
    rows = tuple(_read_rows(run))
    if not rows:
        raise DitlocError(f"{run} has no results yet; run `ditloc bench` into it first")
    methods = list(record["settings"].get("methods") or [DEFAULT_METHOD])
    rankings, by_method, blocks = {}, {}, ()
    for category, concepts in record["concepts"].items():
        for concept in concepts:
            for method in methods:
                loc_path = run / localization_path(category, slugify(concept), method)
                if not loc_path.is_file():
                    continue
                d = _read_json(loc_path, "delete it and rerun `ditloc bench` with the same command to redo it")
                try:
                    by_method[category, concept, method] = _ranking(d)
                    blocks = tuple(d["blocks"])
                except (KeyError, TypeError):
                    raise DitlocError(f"{loc_path} is not a localization; delete it and rerun `ditloc bench` "
                                      "with the same command to redo it") from None
                if method == methods[0]:
                    rankings[category, concept] = by_method[category, concept, method]
    return BenchRun(run, record, rows, blocks, rankings, by_method)
