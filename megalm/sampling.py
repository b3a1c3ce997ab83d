"""Inference on one process: a checkpoint's model loaded (verified first), text sampled from a
language model with temperature, top-k and top-p (``megalm generate``), class probabilities from a
classifier (``megalm classify``).

The checkpoint carries its resolved config (meta.json) and its tokenizer, so the model is rebuilt
exactly, whatever layout saved it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from megalm.checkpoint import catalog
from megalm.checkpoint.shards import CheckpointReader
from megalm.config import ModelConfig, from_dict
from megalm.data.labelled import targets, trim
from megalm.data.tokenizer import eot_id, load_tokenizer
from megalm.errors import CheckpointError, UsageError
from megalm.model.classifier import pooled
from megalm.model.transformer import Transformer
from megalm.parallel.distributed import pick_device

log = logging.getLogger("megalm")


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               classifier: bool = False) -> tuple[Transformer, Path]:
    """The model of a run dir's latest checkpoint (or of one checkpoint dir), in eval mode; every
    file of the checkpoint is checked first (sizes and checksums). A language model, or with
    ``classifier`` a classifier (a model with labels): the other kind is refused, saying what to use."""
    ckpt, meta = catalog.resolve_verified(path)
    cfg = from_dict(ModelConfig, meta.config["model"], "model")
    if cfg.labels and not classifier:
        raise CheckpointError(f"{ckpt}: a classifier of {cfg.labels}, not a language model; use "
                              f"`megalm classify {ckpt.parent.parent}`")
    if classifier and not cfg.labels:
        raise CheckpointError(f"{ckpt}: a language model, not a classifier; fine-tune one with "
                              f"megalm finetune CKPT --task classify --train FILE --eval FILE")
    model = Transformer(cfg)
    model.load_state_dict(CheckpointReader(ckpt, meta).model_state())
    return model.to(device).eval(), ckpt


@torch.no_grad()
def class_log_probs(model: Transformer, ids: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """A classifier's class log-probabilities (N, labels) of right-padded ``ids``, ``batch_size`` rows
    per forward pass."""
    causal, out = model.cfg.objective == "causal", []
    for chunk in ids.split(batch_size):
        chunk = trim(chunk).to(device)
        rows = targets(chunk, torch.zeros(len(chunk), dtype=torch.int64, device=device), causal)
        out.append(torch.log_softmax(pooled(model(chunk), rows[:, 1]).float(), dim=-1).cpu())
    return torch.cat(out)


def tokenizer_for(ckpt: Path):
    return load_tokenizer(ckpt / "tokenizer.json")


@torch.no_grad()
def sample(model: Transformer, prompt_ids: list[int], *, max_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. Returns the new token ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_probs(torch.softmax(logits / temperature, dim=-1), top_k, top_p)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == stop_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the k most likely tokens and the smallest set whose mass reaches top_p; renormalize."""
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1.0:
        # a token stays if the mass before it is still below top_p (so the top token always stays)
        keep &= (sorted_p.cumsum(0) - sorted_p) < top_p
    filtered = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    return filtered / filtered.sum()


def check_sampling(prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """What ``megalm generate``'s options must be (UsageError naming the flag otherwise): checked
    before the model loads, and instead of a torch error or an empty sample after it."""
    if not prompt:
        raise UsageError("--prompt: empty; give the text to continue, e.g. --prompt 'def main():'")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: must be at least 1 (the number of tokens to generate)")
    if not 0 <= temperature < math.inf:  # (also refuses nan)
        raise UsageError(f"--temperature {temperature}: must be a number >= 0 (0 means greedy)")
    if top_k < 0:
        raise UsageError(f"--top-k {top_k}: must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be in (0, 1] (1 disables it)")


def generate_text(path: str | Path, prompt: str, *, max_tokens: int = 100, temperature: float = 0.8,
                  top_k: int = 50, top_p: float = 0.95, seed: int = 0, device: str = "cpu") -> str:
    check_sampling(prompt, max_tokens, temperature, top_k, top_p)
    model, ckpt = load_model(path, pick_device(device, option="--device"))
    if model.cfg.objective != "causal":
        raise CheckpointError(f"{ckpt}: a masked-LM model (model.objective={model.cfg.objective}) fills in masked "
                              f"tokens from both sides; it does not predict the next token, so it cannot generate "
                              f"text. Score it with `megalm eval`, or fine-tune it (`megalm finetune --task classify`)")
    tok = tokenizer_for(ckpt)
    new = sample(model, tok.encode(prompt).ids, max_tokens=max_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed, stop_id=eot_id(tok))
    return prompt + tok.decode(new)
