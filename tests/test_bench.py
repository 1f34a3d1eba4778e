"""`ditloc bench`: rows, determinism, resume after kill -9, two processes, settings guard.

Tiny random PixArt (4 blocks, 32x32, 2 steps), 2 concepts, K in {1, 2}, 2 seeds."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench_helpers import ENV, KS, N_ROWS, N_UNITS, bench_argv, reference_run, run_cli, setup_files, store_lines
from ditloc.bench import CONTROLS, ResultStore, control_blocks, random_blocks
from ditloc.errors import DitlocError
from ditloc.localization import Localization


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_rows_cover_every_condition(reference):
    rows = rows_of(reference)
    assert len(rows) == N_ROWS
    keys = [(r["unit"], r["prompt_index"], r["seed"]) for r in rows]
    assert len(set(keys)) == len(keys)
    units = [json.loads(line) for line in store_lines(reference)]
    assert len(units) == N_UNITS and len({u["unit"] for u in units}) == N_UNITS
    for concept, category in (("red", "color"), ("beach", "place")):
        loc = Localization.load(reference / f"localizations/{category}/{concept}.json")
        mine = [r for r in rows if r["concept"] == concept]
        assert {(r["control"], r["k"]) for r in mine} == {("baseline", 0)} | {(c, k) for c in CONTROLS for k in (1, 2)}
        for r in mine:
            assert (reference / r["image"]).is_file() and 0.0 <= r["score"] <= 1.0
            assert r["eval_text"] == f"{category}: {concept}"
            if r["control"] == "baseline":
                assert r["blocks"] == [] and r["clean_prompt"] is None
            else:
                assert r["blocks"] == control_blocks(loc, r["control"], r["k"], category, concept)
                assert concept not in r["clean_prompt"].split()
        top2 = {r["control"]: r["blocks"] for r in mine if r["k"] == 2}
        assert top2["top"] == loc.ranking[:2] and top2["bottom"] == loc.ranking[-2:]
    # random-K blocks depend only on the concept and K
    loc = Localization.load(reference / "localizations/color/red.json")
    assert control_blocks(loc, "random", 2, "color", "red") == control_blocks(loc, "random", 2, "color", "red")


def test_same_command_same_numbers_and_rerun_reuses(files, reference, tmp_path):
    model, probes = files
    code, _, err = run_cli(bench_argv(model, probes, tmp_path / "again"))
    assert code == 0, err
    assert (tmp_path / "again/results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()
    image = rows_of(reference)[-1]["image"]
    assert (tmp_path / "again" / image).read_bytes() == (reference / image).read_bytes()
    # a finished run: the rerun runs nothing and changes nothing
    code, out, err = run_cli(bench_argv(model, probes, tmp_path / "again"))
    assert code == 0, err
    assert "0 unit(s) run" in out and f"{N_UNITS} reused" in out
    assert len(store_lines(tmp_path / "again")) == N_UNITS
    assert (tmp_path / "again/results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


class Crash(BaseException):
    """A process dying mid-write: nothing in ditloc catches it and nothing is cleaned up."""


def test_resume_after_a_crash_mid_write(files, reference, tmp_path, monkeypatch):
    model, probes = files
    run = tmp_path / "crashed"
    append, calls = ResultStore.append, []

    def dying_append(self, record):  # the 6th unit dies with half its line written
        calls.append(record["unit"])
        if len(calls) == 6:
            with open(self.path, "ab") as f:
                f.write((json.dumps(record) + "\n").encode()[:100])
            raise Crash
        append(self, record)

    monkeypatch.setattr(ResultStore, "append", dying_append)
    with pytest.raises(Crash):
        run_cli(bench_argv(model, probes, run))
    monkeypatch.setattr(ResultStore, "append", append)
    store = run / "results.rank0.jsonl"
    assert len(ResultStore.read(store)) == 5 and not store.read_bytes().endswith(b"\n")
    assert not (run / "results.jsonl").exists()

    code, out, err = run_cli(bench_argv(model, probes, run))
    assert code == 0, err
    assert f"{N_UNITS - 5} unit(s) run, 5 reused" in out and "resuming" in err
    lines = store_lines(run)
    assert len(lines) == N_UNITS and len({json.loads(line)["unit"] for line in lines}) == N_UNITS
    assert (run / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def test_resume_after_kill_9(files, reference, tmp_path):
    model, probes = files
    run = tmp_path / "killed"
    store = run / "results.rank0.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ditloc.cli", *bench_argv(model, probes, run)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (store.exists() and store.read_bytes().count(b"\n") >= 3) and proc.poll() is None:
            assert time.time() < deadline, "the bench subprocess wrote no unit in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = store.read_bytes().count(b"\n")
    assert 3 <= done < N_UNITS and not (run / "results.jsonl").exists()
    with open(store, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"unit": "generate/color/red/top/k1", "kind": "generate", "rows": [{"unit"')
    assert len(ResultStore.read(store)) == done  # the torn line is not read

    code, out, err = run_cli(bench_argv(model, probes, run))
    assert code == 0, err
    assert f"{N_UNITS - done} unit(s) run, {done} reused" in out
    lines = store_lines(run)
    assert len(lines) == N_UNITS and len({json.loads(line)["unit"] for line in lines}) == N_UNITS
    assert (run / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(files, reference, tmp_path):
    model, probes = files
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "ditloc.cli", *bench_argv(model, probes, run)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [ResultStore.read(run / f"results.rank{r}.jsonl") for r in (0, 1)]
    assert all(shards), "both processes must have done units"
    ids = [rec["unit"] for shard in shards for rec in shard]
    assert len(ids) == len(set(ids)) == N_UNITS
    assert (run / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def test_other_settings_refused(files, reference):
    model, probes = files
    before = (reference / "bench.json").read_bytes()
    code, _, err = run_cli(bench_argv(model, probes, reference, ks=(1, 3)))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ditloc: error: ") and "other settings" in err and "ks" in err
    assert (reference / "bench.json").read_bytes() == before


def test_k_beyond_the_blocks_refused(files, tmp_path):
    model, probes = files
    code, _, err = run_cli(bench_argv(model, probes, tmp_path / "bad", ks=(1, 9)))
    assert code == 2 and err.count("\n") == 1 and "at most 4" in err
    assert not (tmp_path / "bad/results.rank0.jsonl").exists()


def test_store_ignores_and_cuts_a_torn_line(tmp_path):
    store = ResultStore(tmp_path / "s.jsonl")
    store.append({"unit": "a"})
    with open(store.path, "ab") as f:
        f.write(b'{"unit": "b", "ro')
    assert ResultStore.read(store.path) == [{"unit": "a"}]
    ResultStore(store.path).append({"unit": "c"})
    assert ResultStore.read(store.path) == [{"unit": "a"}, {"unit": "c"}]
    assert store.path.read_bytes().endswith(b"\n")


def test_random_blocks_draw_as_a_choice_of_names():
    """random_blocks(blocks, k, rng) consumes rng as rng.choice(blocks, k, replace=False), in model order."""
    blocks = [f"block.{i}" for i in range(12)]
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for k in (1, 3, 12, 5):
        assert random_blocks(blocks, k, a) == sorted(b.choice(blocks, k, replace=False).tolist(), key=blocks.index)
    assert a.random() == b.random()


def test_several_methods_in_one_run(files, reference, tmp_path):
    """--localize-methods contribution,patch: each method's top-K and bottom-K, one random-K per K, one baseline;
    the contribution rows are those of a contribution-only run; the report draws every method."""
    from ditloc.bench import read_run
    from ditloc.report import build_report
    from ditloc.report.data import k_for_drop, presence_curves

    model, probes = files
    out = tmp_path / "run"
    code, _, err = run_cli(bench_argv(model, probes, out) + ["--localize-methods", "contribution,patch"])
    assert code == 0, err
    rows = rows_of(out)
    units = {r["unit"] for r in rows}
    # per concept: baseline + per K (top, bottom) x 2 methods + random
    assert len(units) == 2 * (1 + 2 * (2 * 2 + 1))
    for concept, category in (("red", "color"), ("beach", "place")):
        patch = Localization.load(out / f"localizations/{category}/{concept}.patch.json")
        assert patch.method == "patch" and concept not in " ".join(patch.settings["clean_prompts"]).split()
        mine = [r for r in rows if r["concept"] == concept]
        for r in mine:
            if r["method"] == "patch":
                assert r["unit"].split("/")[3] == f"{r['control']}@patch"
                assert r["blocks"] == control_blocks(patch, r["control"], r["k"], category, concept)
        assert {r["unit"] for r in mine if r["control"] == "random"} == {
            f"generate/{category}/{concept}/random/k1", f"generate/{category}/{concept}/random/k2"}
    # the default method's rows are unchanged by adding another method (same names, same numbers)
    ref = {(r["unit"], r["prompt_index"], r["seed"]): r["score"] for r in rows_of(reference)}
    mine = {(r["unit"], r["prompt_index"], r["seed"]): r["score"] for r in rows if r["method"] != "patch"}
    assert mine == ref
    data = read_run(out)
    assert data.methods == ["contribution", "patch"] and len(data.method_rankings) == 4
    assert data.n_generation_units == len(units)
    methods = {(p.control, p.method) for p in presence_curves(data)}
    assert {("top", "patch"), ("bottom", "patch"), ("top", "contribution"), ("random", "")} <= methods
    assert {m.method for m in k_for_drop(data)} == {"contribution", "patch"}
    report = build_report(out)
    assert report.html.is_file()
    # a second run with other methods is refused before any work
    code, _, err = run_cli(bench_argv(model, probes, out) + ["--localize-methods", "patch"])
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1


def test_search_method_withholds_its_sets(files, tmp_path):
    """--localize-methods search: one search per concept up to the largest K, scored by the bench's evaluator; its
    top-K rows withhold S_K, random-K as for every method, no bottom-K; a rerun reuses every unit."""
    from ditloc.bench import read_run
    from ditloc.report import build_report

    model, probes = files
    argv = bench_argv(model, probes, tmp_path / "run") + ["--localize-methods", "search"]
    out = tmp_path / "run"
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    assert "no bottom-K rows" in stdout
    rows = rows_of(out)
    n_units = 2 * (1 + 1 + 2 * len(KS))  # per concept: the search, the baseline, (top, random) x K
    units = [json.loads(line) for line in store_lines(out)]
    assert len(units) == n_units
    for concept, category in (("red", "color"), ("beach", "place")):
        loc = Localization.load(out / f"localizations/{category}/{concept}.search.json")
        assert loc.method == "search" and loc.search.max_k == max(KS)
        # the bench's toy evaluator scored the search (the tiny PixArt has no evaluator of its own)
        assert loc.search.objective == "evaluator" and loc.settings["eval_text"] == f"{category}: {concept}"
        record = next(u for u in units if u["unit"] == f"localize/{category}/{concept}/search")
        assert record["sets"] == [list(s) for s in loc.search.sets] and record["objective"] == "evaluator"
        mine = [r for r in rows if r["concept"] == concept]
        assert {(r["control"], r["k"]) for r in mine} == {("baseline", 0)} | {
            (c, k) for c in ("top", "random") for k in KS}
        for r in mine:
            if r["control"] == "top":
                assert r["method"] == "search" and r["unit"] == f"generate/{category}/{concept}/top@search/k{r['k']}"
                assert r["blocks"] == list(loc.search.sets[r["k"] - 1]) == loc.top(r["k"])
            elif r["control"] == "random":
                assert r["blocks"] == control_blocks(loc, "random", r["k"], category, concept)
        with pytest.raises(DitlocError, match="no bottom-K"):
            control_blocks(loc, "bottom", 1, category, concept)
    data = read_run(out)
    assert data.n_generation_units == len({r["unit"] for r in rows})
    # the report's heat map reads a search's blocks in the order they entered its sets: S_K as prefixes
    assert data.rankings["color", "red"][:2] == Localization.load(
        out / "localizations/color/red.search.json").search.sets[-1]
    assert build_report(out).html.is_file()
    code, stdout, err = run_cli(argv)  # finished: the rerun runs nothing
    assert code == 0, err
    assert "0 unit(s) run" in stdout and f"{n_units} reused" in stdout


def test_unknown_method_refused(files, tmp_path):
    model, probes = files
    code, _, err = run_cli(bench_argv(model, probes, tmp_path / "run") + ["--localize-methods", "contribution,gradient"])
    assert code == 2 and "methods must be" in err and len(err.strip().splitlines()) == 1


# ---- pipeline arguments and progress -----------------------------------------------------------
SMALL = ["--categories", "color", "--k", "1", "--seeds", "0"]  # 1 concept: localize, baseline, 3 controls


def test_pipeline_args_recorded_used_and_bars_drawn(files, tmp_path, monkeypatch):
    model, probes = files
    argv = ["bench", str(model), "--probes", str(probes), "--concepts-per-category", "1", "--evaluator", "toy",
            "--steps", "2", "--out", str(tmp_path / "hw"), *SMALL,
            "--height", "32", "--width", "32", "--pipeline-arg", "clean_caption=false"]
    monkeypatch.setenv("TQDM_DISABLE", "0")  # draw the bars although stderr is captured
    code, _, err = run_cli(argv)
    assert code == 0, err
    expected = {"clean_caption": False, "height": 32, "width": 32}
    assert json.loads((tmp_path / "hw/bench.json").read_text())["settings"]["pipeline_kwargs"] == expected
    loc = json.loads((tmp_path / "hw/localizations/color/red.json").read_text())
    assert expected.items() <= loc["settings"]["pipeline_kwargs"].items()  # what the pipeline was called with
    frames = err.replace("\r", "\n")
    assert "bench: 100%" in frames and "5/5" in frames  # the bar over units
    assert "generate/color/red/top/k1:   0%|" in frames and "| 0/2 [" in frames  # a unit's bar: 1 call x 2 steps
    assert "localize/color/red: done in" in err and "since the start" in err


def test_unknown_pipeline_arg_refused_before_any_unit(files, tmp_path):
    model, probes = files
    code, _, err = run_cli(bench_argv(model, probes, tmp_path / "bad") + ["--pipeline-arg", "bogus=1"])
    assert code == 2 and err.count("\n") == 1 and "takes no argument 'bogus'" in err
    assert not (tmp_path / "bad/results.rank0.jsonl").exists()


def test_image_size_the_evaluator_cannot_read_refused_before_any_unit(files, tmp_path):
    model, probes = files
    code, _, err = run_cli(bench_argv(model, probes, tmp_path / "size") + ["--height", "16", "--width", "24"])
    assert code == 2 and err.count("\n") == 1 and "the toy oracle reads 32x32 images, got 24x16" in err
    assert not (tmp_path / "size/results.rank0.jsonl").exists()  # no localization was run first


def test_run_written_before_pipeline_args_resumes(files, reference, tmp_path):
    """bench.json of a run from before --pipeline-arg has no pipeline_kwargs: the same command resumes it."""
    model, probes = files
    run = tmp_path / "old"
    shutil.copytree(reference, run)
    record = json.loads((run / "bench.json").read_text())
    del record["settings"]["pipeline_kwargs"]
    (run / "bench.json").write_text(json.dumps(record))
    code, out, err = run_cli(bench_argv(model, probes, run))
    assert code == 0, err
    assert "0 unit(s) run" in out and f"{N_UNITS} reused" in out
    code, _, err = run_cli(bench_argv(model, probes, run) + ["--height", "32"])  # other settings: refused
    assert code == 2 and "pipeline_kwargs" in err


def test_run_written_before_the_renames_resumes_and_reports(files, reference, tmp_path):
    """bench.json of a run from before --contribution-terms and --localize-seeds ("variant", "localize_seed"):
    the same command resumes it, the report reads it, and other values are still refused."""
    from ditloc.report import build_report

    model, probes = files
    run = tmp_path / "old"
    shutil.copytree(reference, run)
    record = json.loads((run / "bench.json").read_text())
    settings = record["settings"]
    settings["variant"] = settings.pop("contribution_terms")
    settings["localize_seed"] = settings.pop("localize_seeds")[0]
    (run / "bench.json").write_text(json.dumps(record))
    code, out, err = run_cli(bench_argv(model, probes, run))
    assert code == 0, err
    assert "0 unit(s) run" in out and f"{N_UNITS} reused" in out
    assert "attention contribution, attn_value_out" in build_report(run).html.read_text()
    code, _, err = run_cli(bench_argv(model, probes, run) + ["--localize-seeds", "0,1"])
    assert code == 2 and "localize_seeds" in err
    code, _, err = run_cli(bench_argv(model, probes, run) + ["--contribution-terms", "attn"])
    assert code == 2 and "contribution_terms" in err
