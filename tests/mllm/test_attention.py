import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from mllm.attention import PACKED_EAGER, register


@pytest.fixture()
def llm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    model = LlamaForCausalLM(config)
    register()
    return model


def _packed(sequences):
    collator = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s} for s in sequences])
    batch.pop("labels")
    return batch


def _alone(model, sequences):
    model.set_attn_implementation("sdpa")
    try:
        return [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]
    finally:
        model.set_attn_implementation(PACKED_EAGER)


def test_packed_rows_match_each_example_alone_in_values_and_gradients(llm):
    sequences = [[5, 9, 2, 44, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [60], [8, 8, 8]]
    llm.set_attn_implementation(PACKED_EAGER)
    packed = llm(**_packed(sequences)).logits[0]  # (sum T, V)
    packed.pow(2).mean(-1).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in llm.named_parameters()}
    llm.zero_grad()

    alone = _alone(llm, sequences)
    torch.cat(alone).pow(2).mean(-1).sum().backward()
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)
    for name, p in llm.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_new_packing_is_not_served_the_previous_layout(llm):
    llm.set_attn_implementation(PACKED_EAGER)
    with torch.no_grad():
        for sequences in ([[1, 2, 3], [4, 5, 6, 7]], [[1, 2], [3, 4, 5], [6, 7]], [[9] * 7]):
            packed = llm(**_packed(sequences)).logits[0]
            torch.testing.assert_close(packed, torch.cat(_alone(llm, sequences)), atol=1e-5, rtol=0)


def test_padded_batches_and_cached_generation_match_sdpa(llm):
    input_ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        llm.set_attn_implementation("sdpa")
        reference = llm(input_ids=input_ids, attention_mask=attention_mask).logits
        greedy = llm.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        llm.set_attn_implementation(PACKED_EAGER)
        padded = llm(input_ids=input_ids, attention_mask=attention_mask).logits
        again = llm.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    real = attention_mask.bool()
    torch.testing.assert_close(padded[real], reference[real], atol=1e-5, rtol=0)
    assert again.tolist() == greedy.tolist()


def test_branches_of_a_packed_example_match_each_branch_alone(llm):
    # Example 1 is a tree: prefix [5, 9, 2] then branches [44, 7] and [8, 3, 1]; example 2 is ordinary.
    prefix, branches, other = [5, 9, 2], [[44, 7], [8, 3, 1]], [60, 61, 62, 63]
    packed = _packed([prefix + branches[0] + branches[1], other])
    packed["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3]])
    packed["branch_ids"] = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0]])
    llm.set_attn_implementation(PACKED_EAGER)
    with torch.no_grad():
        tree = llm(**packed).logits[0]  # (12, V)
        first, second, alone_other = _alone(llm, [prefix + branches[0], prefix + branches[1], other])
    torch.testing.assert_close(tree[:5], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(tree[5:8], second[3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(tree[8:], alone_other, atol=1e-5, rtol=0)
    # Without the branch ids the second branch reads the first one: different values.
    packed.pop("branch_ids")
    with torch.no_grad():
        flat = llm(**packed).logits[0]
    assert not torch.allclose(flat[5:8], second[3:], atol=1e-3)
