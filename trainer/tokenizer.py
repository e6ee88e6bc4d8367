"""Tokenizers for the data pipeline: train a byte-level BPE on a corpus, or load a HF ``tokenizer.json``.

Byte-level BPE never meets an unknown character, so one trained on Python source still encodes any text.
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import UserError

EOS_TOKEN = "<|endoftext|>"
# End-of-text spellings of common tokenizer families (GPT-2, Llama 3, Llama 2/Mistral, Gemma), tried in order.
EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and the end-of-text token


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with ``vocab_size`` entries (fewer if the corpus runs out of pairs)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"data.vocab_size must be at least {MIN_BPE_VOCAB} for a byte-level BPE, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path, setting: str) -> Tokenizer:
    """Load a ``tokenizer.json``; ``setting`` names the config key or flag that gave the path, for errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{setting}={str(path)!r}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        raise UserError(f"{setting}={str(path)!r} is not a tokenizers tokenizer.json: {e}") from None


def find_eos_id(tokenizer: Tokenizer, path: str | Path) -> int:
    """The id of the end-of-text token that separates documents; an error names ``path`` if there is none."""
    for token in EOS_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError(f"tokenizer {str(path)!r} has no end-of-text token; expected one of {', '.join(EOS_TOKENS)}")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes: identifies a tokenizer independent of where it is stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
