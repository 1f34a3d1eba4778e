"""Bench: the causal benchmark over a probe set, resumable and sharded.

For every concept of the chosen categories: localize it on its localization
prompts; then generate its evaluation prompts (x seeds) plainly (the baseline)
and with the concept withheld from the top-K, a random K and the bottom-K
blocks for every K, and score the concept's presence in every image against
its evaluation text.

    plan    settings -> concepts and units of work; the blocks each control withholds
    store   the run directory: bench.json, append-only result stores, results.jsonl;
            `read_run`, the one reader of a run (what `ditloc report` reads)
    runner  evaluator, processes, each unit's work, `run_bench`

    from ditloc.bench import BenchSettings, plan_bench, run_bench, read_run
    plan = plan_bench(BenchSettings(model="toy", probes="toy", ks=(1, 2), seeds=(0,), evaluator="toy"))
    run_bench(pipe, plan, "runs/bench")
    run = read_run("runs/bench")          # settings record, rows, rankings

    ground_truth  the toy world's localization ground truth: every single
            block and pair withheld, greedy to K = 4, each localization method judged
            against it (`run_ground_truth`, `summarize_ground_truth`, `ditloc ground-truth`)
"""

from __future__ import annotations

from .plan import (BASELINE, CONTROLS, DEFAULT_METHOD, FORMAT, NO_BOTTOM, BenchPlan, BenchSettings, ConceptPlan, Unit,
                   control_blocks, derived_seed, localization_path, method_controls, plan_bench, random_blocks, slugify)
from .ground_truth import (GroundTruthResult, GroundTruthSettings, MethodMetrics, OracleResult,
                           check_ground_truth_dir, method_metrics, oracle_result, plan_ground_truth,
                           run_ground_truth, summarize_ground_truth)
from .runner import (VLM_QUESTION, BenchResult, Workers, accelerate_workers, generate_scored, make_evaluator,
                     run_bench)
from .store import (RESULTS_FILE, SETTINGS_FILE, BenchRow, BenchRun, ResultStore, check_run_dir, merge_results,
                    read_run, read_units)

__all__ = [
    "BASELINE",
    "BenchPlan",
    "BenchResult",
    "BenchRow",
    "BenchRun",
    "BenchSettings",
    "CONTROLS",
    "DEFAULT_METHOD",
    "ConceptPlan",
    "FORMAT",
    "GroundTruthResult",
    "GroundTruthSettings",
    "MethodMetrics",
    "NO_BOTTOM",
    "OracleResult",
    "RESULTS_FILE",
    "ResultStore",
    "SETTINGS_FILE",
    "Unit",
    "VLM_QUESTION",
    "Workers",
    "accelerate_workers",
    "check_ground_truth_dir",
    "check_run_dir",
    "control_blocks",
    "derived_seed",
    "generate_scored",
    "localization_path",
    "make_evaluator",
    "merge_results",
    "method_controls",
    "method_metrics",
    "oracle_result",
    "plan_ground_truth",
    "plan_bench",
    "random_blocks",
    "read_run",
    "read_units",
    "run_bench",
    "run_ground_truth",
    "slugify",
    "summarize_ground_truth",
]
