"""PFIT's helpfulness and safety reward models (paper IV-C, "Double Reward Model").

:mod:`.data` reads the HH-RLHF preference pairs, :mod:`.model` holds the encoder and the reward
heads, :mod:`.training` fits them, :mod:`.cache` trains once and loads afterwards
(:func:`~.cache.load_or_train_reward_models`), and :mod:`.cli` is ``pwff train-rewards``,
re-exported here as :func:`main`.
"""

from pwff_app.instruct.rewards.cli import main

__all__ = ["main"]
