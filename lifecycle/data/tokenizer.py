"""Tokenizers: train a byte-level BPE on the corpus, or load an existing one."""
from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, model_max_length: int = 4096):
    """A byte-level BPE (GPT-2 style) wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def load_pretrained(name_or_path: str):
    """An existing tokenizer by local directory or hub name (`AutoTokenizer.from_pretrained`)."""
    from transformers import AutoTokenizer

    from lifecycle.errors import ConfigError

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise ConfigError(f"tokenizer.name_or_path={name_or_path!r}: cannot load it ({str(e).splitlines()[0]})"
                          ". Give a local tokenizer directory, or a hub name with network access") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer.name_or_path={name_or_path!r} has no EOS token; documents are packed "
                          "with EOS between them, so pick a tokenizer that has one")
    return tok
