"""Tiny random models for tests and offline benchmarks: no files, no downloads."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Character-level tokenizer (ids: 0 pad, 1 bos, 2 eos, 3 unk, 4..99 ASCII) for the tiny test models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<bos>", "<eos>", "<unk>", *(chr(i) for i in range(32, 127)), "\n"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int = 128, n_layers: int = 4, hidden: int = 32, seed: int = 0) -> PreTrainedModel:
    """A random tiny Llama (GQA: 4 heads, 2 KV heads) for tests; no files needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 128, n_layers: int = 4, hidden: int = 32, seed: int = 0) -> PreTrainedModel:
    """A random tiny GPT-2 for tests; no files needed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=256,
        bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()
