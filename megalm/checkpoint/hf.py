"""Hugging Face format, both ways: a megalm checkpoint of any layout as a ``transformers`` model
directory (safetensors, config.json, tokenizer files), and such a directory as a megalm checkpoint
that training continues from on any layout.

GPT-2 style models map to ``GPT2LMHeadModel`` (whose linear layers are ``Conv1D``: weights stored
transposed, and query, key and value fused in ``c_attn``); Llama style models to
``LlamaForCausalLM`` (separate q/k/v projections, SwiGLU as gate_proj/up_proj, rotary embedding
with the same half-split channel pairing as megalm's). ``transformers`` itself is not needed to
convert: the files are written and read directly.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from megalm.config import VOCAB_MULTIPLE, Config, ModelConfig
from megalm.data.tokenizer import END_OF_TEXT, eot_id, load_tokenizer
from megalm.errors import CheckpointError, UsageError

log = logging.getLogger("megalm.checkpoint")

WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------------------ name maps


def _gpt2_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(megalm name, HF name, transposed) for every tensor of a GPT-2 style model but attention's
    fused c_attn (assembled from q and kv)."""
    pairs = [("embed.tok.weight", "transformer.wte.weight", False), ("embed.pos", "transformer.wpe.weight", False),
             ("norm.norm.weight", "transformer.ln_f.weight", False), ("norm.norm.bias", "transformer.ln_f.bias", False)]
    for i in range(cfg.n_layers):
        m, h = f"blocks.{i}.", f"transformer.h.{i}."
        pairs += [(m + "attn_norm.weight", h + "ln_1.weight", False), (m + "attn_norm.bias", h + "ln_1.bias", False),
                  (m + "attn.out.weight", h + "attn.c_proj.weight", True), (m + "attn.out.bias", h + "attn.c_proj.bias", False),
                  (m + "mlp_norm.weight", h + "ln_2.weight", False), (m + "mlp_norm.bias", h + "ln_2.bias", False),
                  (m + "mlp.up.weight", h + "mlp.c_fc.weight", True), (m + "mlp.up.bias", h + "mlp.c_fc.bias", False),
                  (m + "mlp.down.weight", h + "mlp.c_proj.weight", True), (m + "mlp.down.bias", h + "mlp.c_proj.bias", False)]
    if not cfg.tie_embeddings:
        pairs.append(("head.proj.weight", "lm_head.weight", False))
    return pairs


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(megalm name, HF name, transposed) for every tensor but the fused kv and SwiGLU up weights."""
    pairs = [("embed.tok.weight", "model.embed_tokens.weight", False), ("norm.norm.weight", "model.norm.weight", False)]
    for i in range(cfg.n_layers):
        m, h = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(m + "attn_norm.weight", h + "input_layernorm.weight", False),
                  (m + "attn.q.weight", h + "self_attn.q_proj.weight", False),
                  (m + "attn.out.weight", h + "self_attn.o_proj.weight", False),
                  (m + "mlp_norm.weight", h + "post_attention_layernorm.weight", False),
                  (m + "mlp.down.weight", h + "mlp.down_proj.weight", False)]
    if not cfg.tie_embeddings:
        pairs.append(("head.proj.weight", "lm_head.weight", False))
    return pairs


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megalm one-process state dict -> HF state dict."""
    out = {}
    pairs = _gpt2_pairs(cfg) if cfg.style == "gpt2" else _llama_pairs(cfg)
    for ours, theirs, transposed in pairs:
        out[theirs] = state[ours].t() if transposed else state[ours]
    for i in range(cfg.n_layers):
        m = f"blocks.{i}."
        k, v = state[m + "attn.kv.weight"].chunk(2)
        if cfg.style == "gpt2":
            h = f"transformer.h.{i}.attn.c_attn."
            out[h + "weight"] = torch.cat([state[m + "attn.q.weight"], k, v]).t()
            out[h + "bias"] = torch.cat([state[m + "attn.q.bias"], *state[m + "attn.kv.bias"].chunk(2)])
        else:
            h = f"model.layers.{i}."
            out[h + "self_attn.k_proj.weight"], out[h + "self_attn.v_proj.weight"] = k, v
            gate, up = state[m + "mlp.up.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous().clone() for k, v in out.items()}  # safetensors wants unshared storage


def from_hf(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> megalm one-process state dict (the inverse of ``to_hf``)."""
    state = {}
    pairs = _gpt2_pairs(cfg) if cfg.style == "gpt2" else _llama_pairs(cfg)
    for ours, theirs, transposed in pairs:
        state[ours] = _need(hf, theirs).t() if transposed else _need(hf, theirs)
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        m = f"blocks.{i}."
        if cfg.style == "gpt2":
            h = f"transformer.h.{i}.attn.c_attn."
            q, k, v = _need(hf, h + "weight").t().split([q_width, kv_width, kv_width])
            qb, kb, vb = _need(hf, h + "bias").split([q_width, kv_width, kv_width])
            state[m + "attn.q.weight"], state[m + "attn.q.bias"] = q, qb
            state[m + "attn.kv.weight"], state[m + "attn.kv.bias"] = torch.cat([k, v]), torch.cat([kb, vb])
        else:
            h = f"model.layers.{i}."
            state[m + "attn.kv.weight"] = torch.cat([_need(hf, h + "self_attn.k_proj.weight"),
                                                     _need(hf, h + "self_attn.v_proj.weight")])
            state[m + "mlp.up.weight"] = torch.cat([_need(hf, h + "mlp.gate_proj.weight"),
                                                    _need(hf, h + "mlp.up_proj.weight")])
    return {k: v.float().contiguous() for k, v in state.items()}


def _need(hf: dict, name: str) -> torch.Tensor:
    if name not in hf:
        raise CheckpointError(f"the Hugging Face weights have no {name}")
    return hf[name]


# ------------------------------------------------------------------------------ configs


def hf_config(cfg: ModelConfig, eos: int) -> dict:
    """config.json for ``transformers``."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos,
              "eos_token_id": eos, "torch_dtype": "float32"}
    if cfg.style == "gpt2":
        if cfg.kv_heads != cfg.n_heads:
            raise CheckpointError("a GPT-2 style model with grouped-query attention has no GPT2LMHeadModel equivalent")
        return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
                "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim, "n_positions": cfg.max_seq_len,
                "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            # transformers 4.x reads rope_theta, 5.x rope_parameters
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def model_config(hf: dict, name: str) -> ModelConfig:
    """A megalm model config from a ``transformers`` config.json."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return ModelConfig(
            name=name, style="gpt2", n_layers=hf["n_layer"], d_model=hf["n_embd"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"], vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"],
            tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if kind == "llama":
        rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("attention_bias") or hf.get("mlp_bias") or (hf.get("rope_scaling") or {}).get("rope_type", "default") \
                not in ("default",):
            raise CheckpointError("this Llama config uses biases or RoPE scaling, which megalm's Llama style lacks")
        if hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) * hf["num_attention_heads"] != hf["hidden_size"]:
            raise CheckpointError("megalm needs head_dim * num_attention_heads == hidden_size")
        return ModelConfig(
            name=name, style="llama", n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope))
    raise CheckpointError(f"model_type {kind!r}: megalm converts gpt2 and llama models")


# ------------------------------------------------------------------------------ export / import


def export_hf(ckpt: Path, out: Path, force: bool = False) -> Path:
    """Write a ``transformers`` directory for a megalm checkpoint of any layout; into a directory
    that holds files only with ``force``."""
    from safetensors.torch import save_file

    from megalm.checkpoint import catalog
    from megalm.checkpoint.shards import CheckpointReader
    from megalm.config import from_dict

    _export_target(out, out, force)
    meta = catalog.verify(ckpt)
    cfg = from_dict(ModelConfig, meta.config["model"], "model")
    tok = load_tokenizer(ckpt / "tokenizer.json")
    save_file(to_hf(cfg, CheckpointReader(ckpt, meta).model_state()), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eot_id(tok)), indent=1) + "\n")
    shutil.copyfile(ckpt / "tokenizer.json", out / "tokenizer.json")
    eos = tok.id_to_token(eot_id(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
        "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}, indent=1) + "\n")
    return out


def export_torch(ckpt: Path, out: Path, force: bool = False) -> Path:
    """One file: the consolidated fp32 state dict of the one-process model, with its config; an
    existing file is replaced only with ``force``."""
    from megalm.checkpoint import catalog
    from megalm.checkpoint.shards import CheckpointReader

    _export_target(out, out.parent, force)
    meta = catalog.verify(ckpt)
    torch.save({"model_config": meta.config["model"], "state_dict": CheckpointReader(ckpt, meta).model_state()}, out)
    return out


def _export_target(out: Path, folder: Path, force: bool) -> None:
    """Before anything is read: ``out`` (the directory ``folder`` itself, or a file in it) replaces
    nothing of the user's unless ``force``, and ``folder`` exists (created if need be)."""
    if out == folder:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: is a file; --format hf writes a directory: give a new or empty directory")
        taken = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if taken and not force:
            named = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
            raise UsageError(f"{out}: holds {len(taken)} file{'s' if len(taken) > 1 else ''} ({named}); give a new or "
                             f"empty directory, or --force to write into it, replacing any {WEIGHTS}, config.json, "
                             f"tokenizer.json and tokenizer_config.json there")
    elif out.is_dir():
        raise UsageError(f"{out}: is a directory; --format torch writes one file: give a file name, e.g. {out}/model.pt")
    elif out.exists() and not force:
        raise UsageError(f"{out}: exists; give a new file name, or --force to replace it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a directory must be, no permission, a read-only file system
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise UsageError(f"{out}: cannot create the directory {folder} ({why}); give a path where a directory "
                         f"can be made") from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json), or pytorch_model.bin."""
    from safetensors.torch import load_file

    if (directory / WEIGHTS).is_file():
        return load_file(str(directory / WEIGHTS))
    index = directory / f"{WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(directory / f)).items()}
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: no {WEIGHTS}, {WEIGHTS}.index.json or pytorch_model.bin")


def import_hf(directory: Path, out: Path, pad_vocab: int = 1) -> Path:
    """A ``transformers`` GPT-2 or Llama directory -> a megalm checkpoint (weights, no optimizer
    state) plus ``model.yaml``, the model config to train it with. ``pad_vocab`` rounds the
    vocabulary up to a multiple (e.g. 128, so tensor parallelism can split it): the new rows are
    the mean embedding, which changes the loss slightly; 1 keeps the logits exactly."""
    from megalm.checkpoint.store import save_weights

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; expected a transformers model directory")
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (a fast tokenizer); save one with "
                              f"tokenizer.save_pretrained, or convert the slow one first")
    model = model_config(json.loads((directory / "config.json").read_text()), directory.name)
    state = from_hf(model, read_hf_weights(directory))
    vocab = -(-model.vocab_size // pad_vocab) * pad_vocab
    if vocab != model.vocab_size:
        for name in ("embed.tok.weight", "head.proj.weight"):
            if name in state:
                rows = state[name]
                state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab - len(rows), -1)])
        model = ModelConfig(**{**model.__dict__, "vocab_size": vocab})
    if model.vocab_size % VOCAB_MULTIPLE:
        log.warning("import: a vocabulary of %d is not a multiple of %d; parallel.tp must divide it (or import "
                    "with --pad-vocab %d)", model.vocab_size, VOCAB_MULTIPLE, VOCAB_MULTIPLE)
    tok = load_tokenizer(directory / "tokenizer.json")
    if all(tok.token_to_id(t) is None for t in END_OF_TEXT):
        raise CheckpointError(f"{directory / 'tokenizer.json'}: no end-of-text token ({', '.join(END_OF_TEXT)})")
    return save_weights(out, Config(model=model), state, directory / "tokenizer.json")
