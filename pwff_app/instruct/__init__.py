"""PFIT and the other ``instruct`` methods (paper IV-C): federated PPO on a causal LM's last blocks.

One job a module: :mod:`.policy` (the LM, its trainable blocks, value head and frozen prefix),
:mod:`.sparse_attention` (sparse attention, update masks, packed uploads), :mod:`.prompts`
(Alpaca), :mod:`.rollouts` (sampling), :mod:`.ppo` (the PPO maths and step), :mod:`.rewards`
(the helpfulness and safety reward models), :mod:`.runtime` (what a worker process loads once),
:mod:`.client` (the Flower client handlers) and :mod:`.server` (the strategy and ``run_pfit``).
"""
