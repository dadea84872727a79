"""The study's shared-prefix forward (sft.answer_logits) computes what the full batch computes: same logits, same
loss gradients, on a tiny Llama with right padding, through a PEFT adapter."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from shira_edge.quality.sft import IGNORE, answer_logits, collate, shared_prefix  # noqa: E402
from shira_edge.quality.tasks import Example  # noqa: E402

PREFIX = (5, 9, 2, 7, 7, 3)
CASES = {
    "shared-system-turn": [Example(PREFIX + (11, 12), (20, 21, 1)), Example(PREFIX + (13,), (22, 1)),
                           Example(PREFIX + (14, 15, 16), (23, 24, 25, 1))],
    "nothing-shared": [Example((4, 9, 2), (20, 1)), Example((6, 9, 2, 8), (21, 22, 1))],
    "identical-prompts": [Example(PREFIX, (20, 1)), Example(PREFIX, (21, 22, 23, 1))],
}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("examples", CASES.values(), ids=CASES.keys())
def test_logits_equal_the_full_batch_forward(examples):
    model, batch = tiny_llama(), collate(examples, pad_id=1)
    with torch.no_grad():
        shared, s_targets = answer_logits(model, batch)
        full, f_targets = answer_logits(model, batch, share_prefix=False)
    assert torch.equal(s_targets, f_targets)
    answer = f_targets != IGNORE
    torch.testing.assert_close(shared[answer], full[answer], rtol=1e-5, atol=1e-5)


def test_the_shared_prefix_stops_before_the_last_prompt_token():
    batch = collate(CASES["identical-prompts"], pad_id=1)
    assert shared_prefix(batch["input_ids"], first_answer=len(PREFIX)) == len(PREFIX) - 1
    batch = collate(CASES["shared-system-turn"], pad_id=1)
    assert shared_prefix(batch["input_ids"], first_answer=len(PREFIX) + 1) == len(PREFIX)
    assert shared_prefix(collate(CASES["nothing-shared"], 1)["input_ids"], first_answer=3) == 0


def test_adapter_gradients_equal_the_full_batch_ones():
    from peft import LoraConfig, get_peft_model

    batch = collate(CASES["shared-system-turn"], pad_id=1)
    grads = []
    for share in (True, False):
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                        init_lora_weights=False))
        logits, targets = answer_logits(model, batch, share_prefix=share)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
