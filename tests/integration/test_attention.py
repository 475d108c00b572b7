"""The cpu backend's training attention (edge_tune/training/backends/attention.py) against
transformers' own eager attention, on tiny random models built here."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edge_tune.training.backends import attention, cpu  # noqa: E402
from edge_tune.data.template import IGNORE, Example  # noqa: E402


def tiny(family: str, attn: str, dtype=torch.float32):
    """A random 2-block model of ``family`` with grouped-query attention (4 heads, 2 K/V)."""
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=128)
    if family == "llama":
        config = transformers.LlamaConfig(**shape)
    elif family == "gemma2":  # soft-capped scores and a sliding window
        config = transformers.Gemma2Config(**shape, attn_logit_softcapping=5.0,
                                           sliding_window=8, query_pre_attn_scalar=16)
    else:
        config = transformers.Qwen3Config(**shape)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # scores large enough that the softmax is far from uniform
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding in one row
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_same_logits_and_gradients_as_eager_in_fp32(family):
    assert attention.implementation(family) == attention.NAME
    ids, mask = batch()
    results = []
    for attn in ("eager", attention.NAME):
        model = tiny(family, attn)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (ref, ref_grads), (got, got_grads) = results
    real = mask.bool()
    assert torch.allclose(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == got_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_bf16_keeps_one_copy_of_the_probabilities_and_the_same_loss():
    ids, mask = batch()
    labels = ids.clone()
    saved, losses = {}, {}
    for attn in ("eager", attention.NAME):
        model = with_lora(tiny("llama", attn, torch.bfloat16))
        sizes: dict[int, int] = {}

        def keep(t, sizes=sizes):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = cpu.response_loss(model, ids, labels, mask)
        loss.backward()
        saved[attn], losses[attn] = sum(sizes.values()), loss.item()
    # per block, eager keeps fp32 + bf16 probabilities: 3 x 4 heads x 20 x 20 x 6 bytes
    probs_fp32 = 2 * 3 * 4 * 20 * 20 * 4
    assert saved["eager"] - saved[attention.NAME] >= probs_fp32
    assert losses[attention.NAME] == pytest.approx(losses["eager"], rel=1e-2)


def test_packed_rows_equal_examples_run_one_by_one():
    """The 4-D block-diagonal mask of --pack goes through this attention (fp32 mask on bf16
    scores included): a packed row's loss equals the examples' losses run alone."""
    model = with_lora(tiny("llama", attention.NAME))
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (7, 11, 5):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * 2 + ids[2:]))
    ids, labels, mask, positions, _ = cpu.collate_packed(examples, 0, 23)
    assert ids.shape[0] == 1  # all three in one row
    with torch.no_grad():
        packed = cpu.response_loss(model, ids, labels, mask, positions).item()
        alone, count = 0.0, 0
        for e in examples:
            i, lab, m = cpu.collate([e], 0)
            n = int((lab[:, 1:] != IGNORE).sum())
            alone += cpu.response_loss(model, i, lab, m).item() * n
            count += n
    assert packed == pytest.approx(alone / count, rel=1e-5)


def test_other_families_keep_transformers_eager():
    assert attention.implementation("gpt_oss") == "eager"  # attention sinks: not eager's sum
    assert attention.implementation("some_new_family") == "eager"
