"""`ditloc bench` (the causal benchmark over a probe set), `ditloc ground-truth` (the toy world's localization
ground truth) and `ditloc report` (figures and HTML of either run, or of a `ditloc localize` output)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import _progress
from . import models
from .common import (
    CONTRIBUTION_TERMS,
    DTYPES,
    SEED,
    Once,
    adapter_options,
    add_adapter_option,
    add_model_source,
    add_pipeline_args,
    check_out_and_counts,
    check_run_settings,
    fail,
    main_process_lock,
    pipeline_kwargs,
    retire,
    seed_list,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="causal benchmark over a probe set: presence vs K, top-K against random/bottom-K")
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, 'toy' or 'toy-flux'")
    add_model_source(p)
    p.add_argument("--probes", default="lock", help="lock, toy or a probe file (default lock)")
    p.add_argument("--categories", default=None, metavar="A,B",
                   help="comma-separated categories (default: all of the probe set)")
    p.add_argument("--concepts-per-category", type=int, default=None, metavar="N",
                   help="only the first N concepts of each")
    p.add_argument("--localization-prompts", type=int, default=None, metavar="N",
                   help="only the first N localization prompts")
    p.add_argument("--evaluation-prompts", type=int, default=None, metavar="N",
                   help="only the first N evaluation prompts")
    p.add_argument("--k", default="1,2,4,8", metavar="K,K,...", help="numbers of blocks to withhold (default 1,2,4,8)")
    p.add_argument("--seeds", type=seed_list, action=Once, default=(0, 1, 2), metavar="S,S,...",
                   help="evaluation seeds (default 0,1,2)")
    p.add_argument("--localize-seeds", type=seed_list, action=Once, default=(0,), metavar="S,S,...",
                   help="seeds of the localization trajectories (default 0)")
    p.add_argument("--evaluator", choices=("toy", "clip", "style", "vlm"), required=True)
    p.add_argument("--evaluator-model", default=None, metavar="PATH", help="CLIP / VLM directory or cached hub id")
    p.add_argument("--references", default=None, metavar="DIR",
                   help="style evaluator: a folder per concept of style reference images")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's; on FLUX base models without a guidance embedding, true_cfg_scale)")
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--localize-methods", default="contribution", metavar="M,M,...",
                   help="localization method(s) whose top-K and bottom-K are withheld, compared in one run: "
                        "contribution, patch, attribution, search (default contribution). search: the set-level "
                        "search up to the largest --k, scored by --evaluator; its top-K is the searched set S_K "
                        "and it has no bottom-K (it ranks block sets, not blocks)")
    p.add_argument("--contribution-terms", choices=CONTRIBUTION_TERMS, default="attn_value_out",
                   help="contribution: which terms of the attention output are measured (default attn_value_out)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: where the pipeline loads; each process's own "
                                                  "accelerator under accelerate launch / torchrun")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    add_adapter_option(p)
    add_pipeline_args(p)
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    retire(p, "--method", "--localize-methods M,M,... (a comma list)")
    retire(p, "--seed", SEED)
    retire(p, "--localize-seed", "--localize-seeds S[,S...]")
    p.set_defaults(check=check_run, func=cmd_bench, lock=bench_lock)

    p = sub.add_parser("ground-truth", help="toy world: withhold each concept from every block, pair and greedy "
                                            "set (K <= 4) and judge each localization method against that")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--model", default="toy", help="toy (default), toy-flux or a directory of a toy-world pipeline")
    add_model_source(p)
    p.add_argument("--categories", default=None, metavar="A,B", help="toy categories (default: all six)")
    p.add_argument("--concepts", default=None, metavar="A,B", help="only these concepts (default: all of the categories)")
    p.add_argument("--localize-methods", default="contribution,patch,attribution,search,search-self", metavar="M,M",
                   help="localization methods to judge (default contribution,patch,attribution,search,search-self: "
                        "search = set-level search with the toy oracle, search-self = the model as its own judge)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--n-images", type=int, default=32, help="held-out images per condition (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default 64)")
    p.add_argument("--screen", type=int, default=None, metavar="N",
                   help="measure pairs and greedy sets on N of their images first and complete only those that can "
                        "be their step's best (default: every one on all images)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the pipeline loads)")
    p.add_argument("--report-only", action="store_true",
                   help="only recompute summary.json and summary.md from the directory (no model)")
    retire(p, "--methods", "--localize-methods M,M,...")
    p.set_defaults(check=check_run, func=cmd_ground_truth, lock=main_process_lock)

    p = sub.add_parser("report", help="HTML report and figures of a `ditloc localize`, `bench` or `ground-truth` "
                                      "output directory")
    p.add_argument("run", metavar="DIR", help="the --out of `ditloc localize` (one concept, or one per concept "
                                              "with --concepts-file), `ditloc bench` or `ditloc ground-truth`")
    p.add_argument("--k", type=int, default=None,
                   help="bench: K of the block-selection heat map (default: the largest)")
    p.add_argument("--drop", type=float, default=0.5,
                   help="bench: the K table's rule: the smallest K whose top-K withholding lowers presence by at least "
                        "this fraction of the baseline (default 0.5: halves it, as --k auto)")
    p.add_argument("--grid-samples", type=int, default=4, help="bench: images per concept in the grids (default 4)")
    retire(p, "--threshold", "--drop D (the presence drop: --threshold T is --drop 1-T)")
    p.set_defaults(check=check_report, func=cmd_report)


def check_run(args) -> None:
    """`bench` and `ground-truth`, before the model loads (the run directory: by each command)."""
    check_out_and_counts(args)
    check_run_settings(args)


def bench_lock(rank: int) -> str:
    """Every process of a bench holds its rank's slot of --out (as `run_bench` does)."""
    from .._io import LOCK_FILE

    return f"{LOCK_FILE}.rank{rank}"


def check_report(args) -> None:
    """DIR is an output directory ditloc knows (by its files); its contents are checked as it is read."""
    from ..report import run_kind, unknown_run_message

    args.kind = run_kind(args.run)
    if args.kind is None:
        fail(unknown_run_message(args.run))


def cmd_bench(args) -> None:
    import torch

    from ..bench import (
        BenchSettings,
        accelerate_workers,
        check_run_dir,
        plan_bench,
        run_bench,
    )

    settings = BenchSettings(
        model=args.model, probes=args.probes, ks=_int_list(args.k, "--k"), seeds=args.seeds,
        evaluator=args.evaluator, evaluator_model=args.evaluator_model, references=args.references,
        categories=tuple(c.strip() for c in (args.categories or "").split(",") if c.strip()),
        concepts_per_category=args.concepts_per_category, localization_prompts=args.localization_prompts,
        evaluation_prompts=args.evaluation_prompts, steps=args.steps, guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length, localize_seeds=args.localize_seeds,
        contribution_terms=args.contribution_terms,
        batch_size=args.batch_size, dtype=args.dtype, adapter_options=adapter_options(args),
        methods=tuple(m.strip() for m in args.localize_methods.split(",") if m.strip()),
        pipeline_kwargs=pipeline_kwargs(args),
    )
    plan = plan_bench(settings)
    check_run_dir(args.out, plan)  # before the model loads
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    try:
        cpu = not has_accelerator or (args.device is not None and torch.device(args.device).type == "cpu")
    except RuntimeError:
        fail(f"unknown device {args.device!r}; use e.g. cpu, cuda, cuda:1, mps")
    workers, process_device = accelerate_workers(cpu=cpu)
    device = args.device if workers.world_size == 1 or cpu else str(process_device)
    pipe = models.load_pipeline(args.model, device=device, dtype=args.dtype, **models.source_kwargs(args))
    result = run_bench(pipe, plan, args.out, workers=workers, device=pipe._execution_device, progress=_progress.write)
    if workers.rank == 0:
        print(f"bench: {result.units_run} unit(s) run, {result.units_reused} reused (process 0) in "
              f"{result.seconds:.0f} s; {len(result.rows)} rows")
        if "search" in settings.methods:
            print("search: top-K withheld its searched set S_K; no bottom-K rows (a search ranks block sets, "
                  "not single blocks): compare its top-K with random-K")
        print(f"wrote {result.path} (then: ditloc report {args.out})")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from ..errors import DitlocError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DitlocError(f"{flag} takes comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None


def cmd_ground_truth(args) -> None:
    from ..bench import (
        GroundTruthSettings,
        check_ground_truth_dir,
        plan_ground_truth,
        run_ground_truth,
    )
    from ..bench.ground_truth import SUMMARY_MD, summarize_ground_truth

    if args.report_only:
        summary = summarize_ground_truth(args.out)
    else:
        settings = GroundTruthSettings(
            model=args.model, categories=_names(args.categories), concepts=_names(args.concepts),
            methods=_names(args.localize_methods), steps=args.steps, n_images=args.n_images, batch_size=args.batch_size,
            screen=args.screen)
        plan_ground_truth(settings)  # names and methods, before the model loads
        check_ground_truth_dir(args.out, settings)
        pipe = models.load_pipeline(args.model, device=args.device, **models.source_kwargs(args))
        result = run_ground_truth(pipe, args.out, settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
        summary = result.summary
        print(f"ground-truth: {result.conditions_run} condition(s) run, {result.conditions_reused} reused, "
              f"{result.localizations_run} localization(s), {result.seconds:.0f}s")
    for method, v in summary["summary"].items():
        hit = v["hit_at_1"]
        rate = "–" if hit["rate"] is None else f"{hit['rate']:.2f}"
        regret = v["regret_2"]["mean"]
        print(f"  {method:<13} hit@1 {rate} (n={hit['n']}), mean regret@2 "
              f"{'–' if regret is None else f'{regret:.3f}'} (n={v['regret_2']['n']})")
    if summary["incomplete"]:
        print(f"  {len(summary['incomplete'])} concept/method result(s) incomplete; rerun the same command to finish")
    print(f"wrote {Path(args.out) / SUMMARY_MD}")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def cmd_report(args) -> None:
    from ..report import build_localization_report, build_report
    from ..report.ground_truth import build_ground_truth_report

    if args.kind == "localize":
        loc = build_localization_report(args.run)
        for concept in loc.concepts:
            missing = loc.not_searched[concept]
            print(f"  {concept!r}: " + (f"{len(missing)} block(s) not searched" if missing else "every block scored")
                  + ("; images of the searched sets" if loc.images[concept] else "; no images saved"))
        print(f"wrote {loc.html} and {len(loc.figures)} figures in {loc.html.parent}")
        return
    if args.kind == "ground-truth":
        gt = build_ground_truth_report(args.run)
        for method, v in gt.summary["summary"].items():
            hit = v["hit_at_1"]
            print(f"  {method:<13} hit@1 {hit['rate'] if hit['rate'] is not None else '–'} (n={hit['n']}), "
                  f"regret@2 {v['regret_2']['mean'] if v['regret_2']['mean'] is not None else '–'} "
                  f"(n={v['regret_2']['n']})")
        print(f"wrote {gt.html} and {len(gt.figures)} figures in {gt.html.parent}")
        return
    report = build_report(args.run, k=args.k, drop=args.drop, grid_samples=args.grid_samples)
    print(f"K for the drop (top-K withholding lowers presence by >= {args.drop:g} x baseline):")
    for m in report.k_for_drop:
        print(f"  {m.category:<12} {m.concept:<28} {m.k if m.k is not None else 'none'}")
    print(f"wrote {report.html} and {len(report.figures)} figures in {report.html.parent}")
