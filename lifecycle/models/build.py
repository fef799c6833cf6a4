"""Builders that fit transformers' model APIs to Hydra `_target_` nodes (heavy imports stay inside)."""
from __future__ import annotations

from pathlib import Path

from lifecycle.errors import ConfigError


def llama(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
          intermediate_size: int, max_position_embeddings: int, rope_theta: float, attention_dropout: float,
          tie_word_embeddings: bool, *, vocab_size: int, bos_token_id: int, eos_token_id: int,
          pad_token_id: int | None = None):
    """A randomly initialised LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_attention_heads:
        raise ConfigError(f"model.hidden_size ({hidden_size}) must be divisible by "
                          f"model.num_attention_heads ({num_attention_heads})")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta, attention_dropout=attention_dropout, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return LlamaForCausalLM(config)


def gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int, dropout: float, tie_word_embeddings: bool,
         *, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int | None = None):
    """A randomly initialised GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ConfigError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return GPT2LMHeadModel(config)


def pretrained(name_or_path: str, revision: str | None, trust_remote_code: bool, *, vocab_size: int,
               bos_token_id: int, eos_token_id: int, pad_token_id: int | None = None):
    """Any causal LM by local directory or hub name, through `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM

    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype="float32",
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: cannot load it ({str(e).splitlines()[0]}). "
                          "Give a local model directory, or a hub name with network access "
                          "(HF_HUB_OFFLINE=1 forbids downloads)") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ConfigError(f"model.name_or_path={name_or_path!r} has {model.get_input_embeddings().num_embeddings}"
                          f" token embeddings but the data's tokenizer has {vocab_size}: build the data with "
                          "this model's tokenizer (lifecycle data tokenizer=hf_pretrained "
                          "tokenizer.name_or_path=<same path>)")
    return model
