"""The Transformer: both styles are causal, shapes and init are right, and sampling filters work."""

import pytest
import torch

from megalm.config import ModelConfig
from megalm.sampling import filter_probs, sample
from megalm.model.transformer import Transformer


def tiny(style: str, **kw) -> ModelConfig:
    base = dict(style=style, n_layers=2, d_model=64, n_heads=4, vocab_size=97, max_seq_len=32)
    if style == "llama":
        base["n_kv_heads"] = 2
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_changing_a_future_token_never_changes_an_earlier_logit(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style)).double().eval()
    ids = torch.randint(0, 97, (2, 24))
    logits = model(ids)
    for t in (0, 5, 23):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        other = model(changed)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.allclose(other[:, t:], logits[:, t:])  # and the change does reach later logits


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_loss_at_init_is_near_uniform_and_shapes(style):
    torch.manual_seed(0)
    cfg = tiny(style, tie_embeddings=style == "gpt2")
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (3, 16))
    assert model(ids).shape == (3, 16, 97)
    loss = model(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1
    assert (model.head is None) == cfg.tie_embeddings  # tied: the embedding matrix is the head
    # depth-scaled init on residual projections
    std = model.blocks[0].attn.out.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # 0.02 / sqrt(2 * n_layers)


def test_grouped_query_attention_has_fewer_kv_weights():
    mha = Transformer(tiny("llama", n_kv_heads=4)).blocks[0].attn.kv.weight.shape[0]
    gqa = Transformer(tiny("llama", n_kv_heads=1)).blocks[0].attn.kv.weight.shape[0]
    assert (mha, gqa) == (2 * 64, 2 * 16)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_parameter_count_formula_matches_the_model(style):
    from megalm.model.transformer import parameter_count

    cfg = tiny(style)
    assert parameter_count(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_init_depends_only_on_seed_and_layer():
    a = Transformer(tiny("llama"), seed=3)
    b = Transformer(tiny("llama", n_layers=3), seed=3)  # one more block: earlier layers unchanged
    c = Transformer(tiny("llama"), seed=4)
    torch.testing.assert_close(a.blocks[1].mlp.up.weight, b.blocks[1].mlp.up.weight, rtol=0, atol=0)
    assert not torch.equal(a.blocks[1].mlp.up.weight, c.blocks[1].mlp.up.weight)
    assert not torch.equal(a.blocks[0].mlp.up.weight, a.blocks[1].mlp.up.weight)


def test_top_k_and_top_p_filtering():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    torch.testing.assert_close(filter_probs(probs, 2, 1.0), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    torch.testing.assert_close(filter_probs(probs, 0, 0.75), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    torch.testing.assert_close(filter_probs(probs, 0, 0.1), torch.tensor([1.0, 0, 0, 0, 0]))


def test_sampling_is_reproducible_with_a_seed_and_greedy_is_argmax():
    torch.manual_seed(0)
    model = Transformer(tiny("gpt2")).eval()
    a = sample(model, [1, 2, 3], max_tokens=12, temperature=1.0, top_k=20, seed=7)
    b = sample(model, [1, 2, 3], max_tokens=12, temperature=1.0, top_k=20, seed=7)
    c = sample(model, [1, 2, 3], max_tokens=12, temperature=1.0, top_k=20, seed=8)
    assert a == b and a != c and len(a) == 12
    greedy = sample(model, [1, 2, 3], max_tokens=1, temperature=0)
    assert greedy == [int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax())]
