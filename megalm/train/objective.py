"""What the model learns to predict: inputs and labels from token sequences (``model.objective``).

Both objectives take the loader's rows of ``seq_len + 1`` tokens and give ``seq_len`` inputs and
labels, with ``IGNORE`` where a label does not count (padding rows, skipped shards, and for the
masked objective every position that was not chosen):

- ``causal``: next-token prediction, labels are the inputs shifted by one.
- ``masked``: BERT's masked LM over the first ``seq_len`` tokens. A share ``mask_prob`` of the
  positions (never special tokens) is chosen; of those, ``mask_token_share`` become the mask token,
  ``mask_random_share`` a random ordinary token, the rest stay as they were; the labels are the
  original tokens at the chosen positions only.

Masking depends only on (seed, step, the row's place in the global batch, the position), through a
counter-based hash, never on a random stream's history: so it is the same on any layout, in any
loader worker, and after any resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megalm.common import IGNORE
from megalm.config import Config
from megalm.data.tokenizer import load_tokenizer, mask_id, special_ids

EVAL_STEP = -1  # the "step" whose masks the validation sequences get, the same at every evaluation


class CausalLM:
    masked = False

    def examples(self, tokens: torch.Tensor, valid: torch.Tensor | None, step: int,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token labels of ``tokens`` (rows, seq_len + 1)."""
        labels = tokens[:, 1:]
        if valid is not None:
            labels = torch.where(valid[:, 1:], labels, IGNORE)
        return tokens[:, :-1], labels


class MaskedLM:
    masked = True

    def __init__(self, mask_token: int, specials: list[int], vocab_size: int, seed: int, prob: float,
                 token_share: float, random_share: float):
        self.mask_token, self.seed, self.prob = mask_token, seed, prob
        self.token_share, self.random_share = token_share, random_share
        self.specials = torch.tensor(specials, dtype=torch.int64)
        self.ordinary = torch.tensor(sorted(set(range(vocab_size)) - set(specials)), dtype=torch.int64)

    def examples(self, tokens: torch.Tensor, valid: torch.Tensor | None, step: int,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs and labels of the first ``seq_len`` tokens of each row; ``rows`` are the
        rows' indices in the global batch (or the validation set), which seed their masks."""
        x = tokens[:, :-1]
        draws = [_uniform(self.seed, step, rows, x.shape[1], stream) for stream in range(3)]
        chosen = (draws[0] < self.prob) & ~torch.isin(x, self.specials)
        if valid is not None:
            chosen &= valid[:, :-1]
        to_mask = chosen & (draws[1] < self.token_share)
        to_random = chosen & ~to_mask & (draws[1] < self.token_share + self.random_share)
        random_tokens = self.ordinary[(draws[2] * len(self.ordinary)).long().clamp(max=len(self.ordinary) - 1)]
        inputs = torch.where(to_mask, self.mask_token, torch.where(to_random, random_tokens, x))
        return inputs, torch.where(chosen, x, IGNORE)


def build_objective(cfg: Config, tokenizer: str | Path) -> CausalLM | MaskedLM:
    m = cfg.model
    if m.objective == "causal":
        return CausalLM()
    tok = load_tokenizer(tokenizer)
    return MaskedLM(mask_id(tok, tokenizer), special_ids(tok), tok.get_vocab_size(), cfg.data.seed, m.mask_prob,
                    m.mask_token_share, m.mask_random_share)


_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
_MASK64 = (1 << 64) - 1


def _uniform(seed: int, step: int, rows: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """Uniform [0, 1) numbers for (rows, positions), a pure function of its arguments: splitmix64's
    output function applied to a counter made of them."""
    key = np.uint64((seed * 0xD1B54A32D192ED03 + (step & _MASK64) * 0xA24BAED4963EE407 + stream * _GAMMA) & _MASK64)
    counter = rows.numpy().astype(np.uint64)[:, None] << np.uint64(32) | np.arange(length, dtype=np.uint64)[None, :]
    z = key + (counter + np.uint64(1)) * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)
