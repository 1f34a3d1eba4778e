"""How `ditloc personalize` and `ditloc unlearn` train: the device, dtype and the edit's config from the
flags (closed form, plain training or `--robust`)."""

from __future__ import annotations

from .. import _progress
from .common import run_options


def train_device(args) -> str | None:
    """Where training runs: --device (None: where the pipeline loads, the CPU); under accelerate
    launch, each process's own accelerator, or the CPU (gloo) with --device cpu or on a machine without one."""
    from ..processes import current, launched

    if not launched():
        return args.device
    procs = current(args.device)
    return str(procs.device)


def edit_setup(args) -> tuple[dict, str | None, str | None, bool]:
    """The keyword arguments personalize and unlearn share (the edit's config among them), where the model
    loads and in what dtype, and whether this process reports (under accelerate launch only process 0)."""
    from ..edit import ClosedFormConfig, RobustConfig, TrainConfig
    from ..processes import current

    seed = args.seeds[0]  # the edit's; every seed localizes (--blocks auto)
    if args.edit_method == "closed-form":
        gap = {"gap_fraction": args.gap_fraction} if args.gap_fraction is not None else {}
        config = ClosedFormConfig(preserve_weight=args.preserve_weight, ridge=args.ridge, positions=args.positions,
                                  seed=seed, **gap,
                                  preserve_mode=args.preserve_mode, export_lora=not args.no_lora_export,
                                  pooled=args.pooled_edit)
    else:
        given = {k: v for k, v in (("rank", args.lora_rank), ("steps", args.train_steps), ("lr", args.lr))
                 if v is not None}
        settings = dict(
            method=args.edit_method, batch_size=args.batch_size, seed=seed,
            gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
            mixed_precision=args.mixed_precision, lora_modules=args.lora_modules, **given)
        if getattr(args, "robust", False):
            if args.attack_steps is not None:
                settings["attack_steps"] = args.attack_steps
            if args.images_per_prompt is not None:
                settings["images_per_prompt"] = args.images_per_prompt
            config = RobustConfig(**settings)
        else:
            config = TrainConfig(**settings)
    main_process = current(args.device).is_main
    device = train_device(args)
    # mixed precision: the base weights in bfloat16 unless --dtype says otherwise
    dtype = args.dtype or ("bfloat16" if args.mixed_precision == "bf16" else None)
    common = {"blocks": args.blocks, "k": args.k, "localize_seeds": tuple(args.seeds), "config": config, "out": args.out, "options": run_options(args),
              "progress": _progress.write if main_process else None, "localize_method": args.localize_method,
              "objective": args.objective, "eval_text": args.eval_text}
    return common, device, dtype, main_process
