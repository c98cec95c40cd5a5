import math

import torch
import torch.nn.functional as F

from rlhf.algos.sft import sft_loss


def test_sft_loss_matches_masked_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.float)
    loss = sft_loss(logits, ids, mask, num_tokens=mask.sum())
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
    expected = (ref * mask.reshape(-1)).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_sft_loss_hand_numbers():
    # uniform logits over 4 tokens: every target costs log 4; two counted tokens, N = 2
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[0, 1, 2]])
    loss = sft_loss(logits, ids, torch.tensor([[1.0, 1.0]]), num_tokens=2)
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-6)


def test_micro_batch_losses_add_up_to_the_step_mean():
    torch.manual_seed(1)
    logits, ids = torch.randn(4, 6, 7), torch.randint(0, 7, (4, 6))
    mask = (torch.rand(4, 5) > 0.3).float()
    whole = sft_loss(logits, ids, mask, mask.sum())
    parts = sum(sft_loss(logits[i:i + 1], ids[i:i + 1], mask[i:i + 1], mask.sum()) for i in range(4))
    torch.testing.assert_close(whole, parts)
