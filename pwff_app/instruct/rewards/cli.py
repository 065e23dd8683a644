"""``pwff train-rewards [--judges]``: train (or load from the cache) both PFIT training reward models,
or with ``--judges`` both evaluation judges, and print their held-out pairwise accuracy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pwff_app.device import resolve_device
from pwff_app.instruct.rewards.cache import default_cache_dir, load_or_train_reward_models
from pwff_app.instruct.rewards.data import HH_HUB_ID


def main(argv: list[str] | None = None) -> int:
    """``pwff train-rewards [...]`` (or ``python -m pwff_app.instruct.rewards``); returns the exit code."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="pwff train-rewards", description="Train the PFIT helpfulness and safety reward models."
    )
    parser.add_argument("--data-dir", default=os.environ.get("PWFF_DATA_DIR", ""),
                        help="folder holding hh-rlhf/ (default: $PWFF_DATA_DIR; none: the Hub, --dataset)")
    parser.add_argument("--dataset", default=HH_HUB_ID,
                        help=f"Hub id of HH-RLHF, used without a data folder (default: {HH_HUB_ID})")
    parser.add_argument("--cache-dir", default=None, help=f"where trained models go (default: {default_cache_dir()})")
    parser.add_argument("--device", default="auto",
                        help="where to encode and train: auto (CUDA when visible, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--judges", action="store_true",
                        help="the evaluation's judges (cross-encoders on the other half of HH-RLHF, TRL's "
                             "RewardTrainer; never used in training) instead of the training reward models")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached model matches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths stay copyable
    try:
        if args.judges:
            from pwff_app.instruct.rewards.judges import default_judge_cache_dir, load_or_train_judges

            models = load_or_train_judges(args.data_dir or None,
                                          Path(args.cache_dir) if args.cache_dir else default_judge_cache_dir(),
                                          force=args.force, dataset=args.dataset, device=resolve_device(args.device))
        else:
            models = load_or_train_reward_models(args.data_dir or None,
                                                 Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                                                 progress=not args.quiet, force=args.force, dataset=args.dataset,
                                                 device=resolve_device(args.device))
    except FileNotFoundError as err:
        console.print(f"error: {err}")
        return 2
    kind = "judges (evaluation only)" if args.judges else "training reward models"
    table = Table(title=f"PFIT {kind}: held-out pairwise accuracy")
    for column in ("objective", "held-out acc", "train acc", "pairs train/held-out", "seconds"):
        table.add_column(column, justify="left" if column == "objective" else "right")
    for name, m in models.metrics["objectives"].items():
        table.add_row(name, f"{m['heldout_accuracy']:.3f}", f"{m['train_accuracy']:.3f}",
                      f"{m['n_train']} / {m['n_heldout']}", f"{m['seconds']:.1f}")
    out = Console(soft_wrap=True)
    out.print(table)
    how = "loaded from cache" if models.from_cache else "trained and saved"
    out.print(f"{how}: {models.cache_path} (training, encoding included, took {models.metrics['seconds']:.1f} s)")
    return 0
