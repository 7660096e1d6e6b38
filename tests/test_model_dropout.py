"""The model's own dropout with LoRA's CPU masks: the same rate and expectation, a bool mask kept for backward."""

import torch

from lora_ft.modeling.lora_dropout import keep_mask
from lora_ft.modeling.model_dropout import MaskedDropout, swap_model_dropout


def test_masked_dropout_drops_at_p_scales_by_the_drawn_p_and_passes_the_gradient_through_its_mask():
    drop = MaskedDropout(0.1)
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(4)
    y = drop(x)
    torch.manual_seed(4)
    keep, p = keep_mask(x.shape, 0.1, x.device)
    torch.testing.assert_close(y.detach(), keep.float() / (1 - p), rtol=0, atol=0)
    assert abs(keep.float().mean().item() - 0.9) < 3e-3
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2 * keep.float() / (1 - p), rtol=0, atol=0)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_backward_keeps_a_one_byte_mask_not_a_noise_tensor():
    saved = []
    x = torch.randn(64, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MaskedDropout(0.1)(x)
    # the bool mask's uint8 view (the multiply's fast operand): one byte per value, 1 where y kept x
    assert [(t.dtype, t.element_size(), t.shape) for t in saved] == [(torch.uint8, 1, x.shape)]
    assert set(saved[0].unique().tolist()) == {0, 1} and torch.equal(saved[0].bool(), y != 0)


def test_the_swap_takes_the_model_s_dropouts_and_leaves_lora_s(bert_lora):
    model, _ = bert_lora
    before = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert swap_model_dropout(model) == 0  # attach_adapters did it already
    swapped = {n for n, m in model.named_modules() if type(m) is MaskedDropout}
    assert swapped and swapped == {n for n in before if "lora_dropout" not in n}
    assert {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)} == before
    # The tiny BERT: embeddings, 3 per layer (SDPA reads the attention one's p), the classifier's.
    config = model.get_base_model().config
    assert len(swapped) == 1 + 3 * config.num_hidden_layers + 1


def test_p_zero_is_the_identity_in_training():
    x = torch.randn(8, 8)
    assert torch.equal(MaskedDropout(0.0).train()(x), x)
