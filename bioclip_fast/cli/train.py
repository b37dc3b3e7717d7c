"""`bioclip-fast train`: every TrainConfig field is a flag; `--config FILE` (YAML/JSON) supplies defaults.

With no arguments (and no --data) the `butterflies` preset runs: the tiny model on the bundled butterfly shards for
a few minutes on CPU, then zero-shot top-1 on the held-out butterflies (printed; saved in <run dir>/results.json).
Multi-process: `torchrun --nproc-per-node N -m bioclip_fast train ...` or `deepspeed --num_gpus N ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, get_origin

_NONE = ("none", "null")


def _scalar(base):
    def parse(s: str):
        if s.lower() in _NONE:
            return None
        return base(s)

    parse.__name__ = base.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bioclip_fast.train.config import field_specs, unwrap_optional

    parser.description = (parser.description or "") + (
        ". Defaults are the BioCLIP 2 recipe (preset bioclip2); without --data the 'butterflies' CPU preset applies "
        "(bioclip-nano, bundled butterflies, batch 128, lr 2e-3, 30 warmup steps, fp32, a 4.25-minute wall-clock cosine)."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--config", default=None, help="YAML or JSON file of config keys (CLI flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # the `deepspeed` launcher appends --local_rank=N; the rank comes from the LOCAL_RANK env var it also sets
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    for name, hint, default, meta in field_specs():
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"{meta['help']} [{default}]"}
        base, optional = unwrap_optional(hint)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if get_origin(base) is list:
            kw["nargs"] = "+"
        elif base in (int, float, str):
            kw["type"] = _scalar(base) if optional else base
            kw["metavar"] = base.__name__.upper()
        if "choices" in meta:
            kw["choices"] = meta["choices"]
            kw.pop("metavar", None)
        parser.add_argument(flag, **kw)


def run(args: argparse.Namespace) -> int:
    """Expected failures raise UsageError/ValueError/OSError: `bioclip-fast train: error: ...`, exit 2
    (:func:`bioclip_fast.cli.run_subcommand`).

    Exit codes of their own: 3 = stopped on a non-finite loss; 75 = stopped by SIGTERM/SIGINT/SIGUSR1 (or its
    launcher's death) after writing a checkpoint (run it again with --resume auto); 4 = this rank stopped because
    another rank failed (failures.py)."""
    from bioclip_fast.errors import EXIT_NONFINITE, EXIT_PREEMPTED, UsageError
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.preflight import validate_static

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bioclip_fast").setLevel(logging.INFO)  # ours at INFO; open_clip's chatter stays quiet
    from bioclip_fast.train import failures

    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config", "print_config", "local_rank",
                                                            "debug")}
    try:  # the same on every rank: printed once (failures.py)
        cfg = resolve_config(cli, config_file=args.config)
        validate_static(cfg)
    except (UsageError, ValueError) as e:
        code = failures.handle(e, "bioclip-fast train", debug=getattr(args, "debug", False))
        if code is None:
            raise
        return code
    if args.print_config:
        from bioclip_fast.train.config import PAPER_GPUS, resolve_batches

        world = int(os.environ.get("WORLD_SIZE", "1"))
        batches = resolve_batches(cfg, world)
        out = cfg.to_dict()
        out["batches"] = {**batches, "world_size_from": "$WORLD_SIZE" if "WORLD_SIZE" in os.environ else "default 1"}
        if cfg.batch_size_per_gpu is not None:  # what the per-GPU figures give on the paper's 32 GPUs
            out["batches"][f"global_on_{PAPER_GPUS}_gpus"] = {
                "batch": cfg.batch_size_per_gpu * PAPER_GPUS,
                "replay": (cfg.replay_batch_size_per_gpu or 0) * PAPER_GPUS}
        print(json.dumps(out, indent=1))
        return 0
    from bioclip_fast.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
    except NonFiniteLossError as e:  # every rank stops at the same step (the loss is all-reduced): rank 0 says it
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"bioclip-fast train: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except BaseException as e:  # several ranks: one error line per job (failures.py)
        code = failures.handle(e, "bioclip-fast train", debug=getattr(args, "debug", False))
        if code is None:
            raise
        return code
    if summary.get("preempted"):
        if trainer.info.is_main:
            print(f"bioclip-fast train: stopped by {summary['preempted']} after step {summary['steps']}; checkpoint "
                  f"{summary['checkpoint']}; continue with: bioclip-fast train ... --out {summary['run_dir']} "
                  f"--resume auto", file=sys.stderr)
        return EXIT_PREEMPTED
    if trainer.info.is_main:
        print_summary(summary)
    return 0


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        f"run dir     : {s['run_dir']}",
        f"steps       : {s['steps']} in {s['train_seconds']:.0f} s ({s.get('img_s', 0):.1f} img/s, "
        f"data wait {100 * s.get('data_wait_frac', 0):.0f}%), final loss {s['final_loss']:.4f}"
        if s.get("final_loss") is not None else f"steps       : {s['steps']}",
    ]
    zs = s.get("zero_shot")
    if zs:
        present = len(zs.get("per_class", {}))  # classes the held-out images hold
        scored = zs.get("n_classes") or present  # classes the classifier chose among: sets chance
        of = (f"{present} classes" if present == scored else
              f"{present} class{'es' if present != 1 else ''} (the classifier scored {scored})")
        lines.append(
            f"zero-shot   : top-1 {100 * zs['top1']:.1f}%  top-5 {100 * zs['top5']:.1f}%  on {zs.get('n', '?')} "
            f"held-out images, {of} (chance {100 / max(scored, 1):.0f}%)"
        )
    ls = s.get("loader_stats") or {}
    if ls.get("skipped_corrupt"):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((ls.get("bad_samples") or {}).items()))
        ranks = [r for r in ls.get("per_rank") or [] if r["skipped_corrupt"]]
        by_rank = (" on " + ", ".join(f"rank {r['rank']}: {r['skipped_corrupt']}" for r in ranks)) if ranks else ""
        lines.append(f"bad samples : {ls['skipped_corrupt']} skipped and replaced ({reasons}){by_rank}; "
                     f"{ls.get('bad_shards', 0)} damaged shard(s), named in the log and results.json")
    for w in s.get("warnings") or []:
        lines.append(f"warning     : {w}")
    lines.append(f"results     : {s['run_dir']}/results.json, plot {s.get('plot')}, model {s.get('model_path')}")
    print("\n".join(lines))
