"""Ground truth for localization on the toy world, and every method judged against it.

Per toy concept, withhold the concept from every single block, every pair of
blocks and greedily up to K = 4 blocks, generate held-out images and read the
concept's presence with the toy oracle. Then localize the concept with each
method and score its ranking against that search:

    drop(S)      baseline presence - presence with S withheld
    hit@1        the method's top block is the best single block (a tie within 1e-9 counts)
    regret@K     best achievable drop at K - drop of the method's top-K, K = 1, 2, 4
                 (best single, best pair, and at 4 the *greedy* set: the search is exhaustive to K = 2 only)
    spearman     rank correlation of the method's block scores with the single-block drops
    pair rank    where the method's top-2 pair falls among all pairs by drop (1 = best)
    minimal K    oracle: the smallest K in 1..4 whose best set (best single, best pair, greedy 3,
                 greedy 4) brings presence below half the baseline, else None (">4");
                 the method's own automatic K (`score_mass_k(scores, 0.5)`; a search's:
                 `SetSearch.k_for_drop(0.5)`), compared with it

A *condition* is the set of blocks withheld (the empty set: the baseline). Each
(concept, condition) is generated once and appended, with every image's score,
to ``conditions.jsonl``; a rerun of the same command reads it and computes only
what is missing.

Screening (`GroundTruthSettings.screen`, `--screen N`): the pairs and each greedy step's
sets are first measured on a fixed draw of N of their images; lowest mean first, they are
completed to all images until the next one's screened mean lies `screen_margin(N)` above the
best completed presence (Hoeffding, sampling without replacement: a set stopped there is
below that best with probability <= SCREEN_DELTA). A pair that erases is completed; the many
that remove nothing stop at N images. A screened condition's line carries "screen" (its image
indices); its completion is a later line with every image, which wins on reading.

The run directory:

    ground_truth.json                            settings, model record, concepts (prompts, samples), methods
    conditions.jsonl                             one line per (concept, condition): blocks, per-image scores
    localizations.jsonl                          one line per (concept, method): block scores, automatic K
    localizations/<category>/<slug>.<method>.json  the full Localization (per step, sample and head; large)
    summary.json, summary.md                     `summarize_ground_truth(out)`: recomputed from the two
                                                 JSONL stores and ground_truth.json (not localizations/)

    from ditloc.bench import GroundTruthSettings, run_ground_truth, summarize_ground_truth
    result = run_ground_truth(ditloc.toy.load_pipeline(), "runs/gt", GroundTruthSettings(categories=("hazard",)))
    summary = summarize_ground_truth("runs/gt")     # no model needed
"""

from . import joint
from .metrics import (
                      MethodMetrics,
                      OracleResult,
                      auto_k,
                      greedy_sets,
                      method_conditions,
                      method_metrics,
                      oracle_result,
                      paired_regrets,
                      ranking,
                      spearman,
                      summarize_methods,
)
from .run import GroundTruthResult, expected_conditions, run_ground_truth
from .settings import (
                      FORMAT,
                      HALF,
                      LOCALIZATIONS_FILE,
                      MAX_K,
                      METHODS,
                      SCREEN_DELTA,
                      SETTINGS_FILE,
                      STORE_FILE,
                      SUMMARY_JSON,
                      SUMMARY_MD,
                      GroundTruthSettings,
                      check_ground_truth_dir,
                      localization_file,
                      plan_ground_truth,
                      sample_calls,
                      samples,
                      screen_indices,
                      screen_margin,
)
from .store import read_conditions, read_localizations
from .summary import summarize_ground_truth, summary_markdown, summary_tables

__all__ = [
    "FORMAT", "HALF", "LOCALIZATIONS_FILE", "MAX_K", "METHODS", "SCREEN_DELTA", "SETTINGS_FILE", "STORE_FILE", "SUMMARY_JSON",
    "SUMMARY_MD", "GroundTruthResult", "GroundTruthSettings", "MethodMetrics", "OracleResult", "auto_k",
    "check_ground_truth_dir", "expected_conditions", "greedy_sets", "joint", "localization_file", "method_conditions",
    "method_metrics", "oracle_result", "paired_regrets", "plan_ground_truth", "ranking", "read_conditions", "read_localizations",
    "run_ground_truth", "sample_calls", "samples", "screen_indices", "screen_margin", "spearman", "summarize_ground_truth", "summarize_methods", "summary_markdown",
    "summary_tables",
]
