"""Byte-level BPE tokenizers with HF ``tokenizers``: train one on a corpus, or load a given file.

Byte-level means every input byte has a token, so any text encodes without unknown tokens. The
end-of-text token separates documents when they are packed into training sequences; the mask token
stands in for hidden tokens under the masked-LM objective (``model.objective=masked``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megalm.errors import DataError

EOT = "<|endoftext|>"
MASK = "<|mask|>"
# what imported tokenizers call their end-of-text token, tried in order after ours
END_OF_TEXT = (EOT, "</s>", "<|end_of_text|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json, or the one in a directory (a run dir, a checkpoint, a prepared data
    directory: so ``data.tokenizer=RUN_DIR`` prepares data for that run's model); a missing or
    corrupt file is a DataError that names it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{path}: not a valid HF tokenizers file ({e}); re-run `megalm prepare` or pass a good data.tokenizer") from None
    if all(tok.token_to_id(t) is None for t in END_OF_TEXT):
        raise DataError(f"{path}: tokenizer has no end-of-text token ({', '.join(END_OF_TEXT)}), which separates "
                        f"documents")
    return tok


def mask_id(tok: Tokenizer, path: str | Path) -> int:
    """The mask token's id; a tokenizer without one (trained before megalm added it, or imported)
    cannot serve a masked-LM objective."""
    found = tok.token_to_id(MASK)
    if found is None:
        raise DataError(f"{path}: tokenizer has no mask token {MASK}, which model.objective=masked needs; prepare "
                        f"the data again with a new tokenizer (megalm prepare ... --force, without data.tokenizer)")
    return found


def special_ids(tok: Tokenizer) -> list[int]:
    """Ids of the special tokens (end-of-text, mask, …): never masked, never drawn as random tokens."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """How many bytes of UTF-8 text each token id stands for (indexed by id), for losses per byte
    that compare models with different tokenizers. A byte-level BPE token is a string over
    ByteLevel's alphabet of 256 characters, one per byte; special tokens (end-of-text) stand for
    no text, other added tokens for their own text. DataError for a tokenizer that is not
    byte-level (e.g. SentencePiece-style, with byte fallback)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = tok.get_added_tokens_decoder()
    lengths = np.zeros(tok.get_vocab_size(), np.int64)
    for token, i in tok.get_vocab().items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode())
        elif set(token) <= alphabet:
            lengths[i] = len(token)
        else:
            raise DataError(f"token {token!r} (id {i}) is not byte-level BPE: its text's byte count is unknown")
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of ``texts`` concatenated, and the number of each text's: one call into
    tokenizers for all (without the character offsets, which would cost a third more time)."""
    ids = [np.array(e.ids, dtype) for e in tok.encode_batch_fast(texts)]
    lengths = np.array([len(a) for a in ids], np.int64)
    return (np.concatenate(ids) if ids else np.zeros(0, dtype)), lengths


def eot_id(tok: Tokenizer) -> int:
    return next(tok.token_to_id(t) for t in END_OF_TEXT if tok.token_to_id(t) is not None)


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of what maps text to token ids: the vocabulary and merges, added tokens, normalizer
    and pre-tokenizer, canonically serialized. The same tokenizer saved by another tool (e.g.
    ``transformers``, which adds an empty post-processor) hashes the same."""
    spec = json.loads(load_tokenizer(path).to_str())
    ids = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()
