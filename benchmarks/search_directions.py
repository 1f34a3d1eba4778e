"""Backward elimination vs forward selection on the ground truth's search settings (6 localization prompts x
seeds 0,1 at 10 steps, toy oracle soft presence): which K = 1..4 sets backward elimination finds, to compare with
the forward search's sets in benchmarks/results/ground_truth_toy/localizations.jsonl. Resumable (checkpoints).

    python benchmarks/search_directions.py zibbit,blip,hazard runs/backward
    # 2026-12-06, 2-core CPU shared with the ground-truth run, 1 thread: benchmarks/results/search_directions/
"""
import json, sys
import torch
import ditloc
from ditloc.bench.ground_truth import GroundTruthSettings, plan_ground_truth
from ditloc.bench.ground_truth.settings import search_prompt_indices, SEARCH_SEEDS, SEARCH_STEPS
from ditloc.localization import SearchConfig
torch.set_num_threads(1)
pipe = ditloc.toy.load_pipeline(); pipe.set_progress_bar_config(disable=True)
settings = GroundTruthSettings(concepts=tuple(sys.argv[1].split(",")))
OUT = sys.argv[2] if len(sys.argv) > 2 else "runs/backward"
import os; os.makedirs(OUT, exist_ok=True)
out = {}
for c in plan_ground_truth(settings):
    idx = search_prompt_indices(len(c.localization_prompts))
    loc = ditloc.localize(pipe, [c.localization_prompts[i] for i in idx], c.concept, method="search",
                          search=SearchConfig(objective="evaluator", direction="backward", search_steps=SEARCH_STEPS,
                                              rank="generation"),
                          eval_text=c.eval_text, clean_prompts=[c.localization_clean_prompts[i] for i in idx],
                          seed=list(SEARCH_SEEDS), options=settings.run_options,
                          checkpoint=f"{OUT}/{c.concept}.jsonl")
    out[c.concept] = {"sets": [list(s) for s in loc.search.sets], "presence": list(loc.search.presence),
                      "baseline": loc.search.baseline, "generations": loc.search.cost["sets_evaluated"]}
    print(c.concept, out[c.concept], flush=True)
    json.dump(out, open(f"{OUT}/result.json", "w"), indent=1)
