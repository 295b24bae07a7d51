"""DiLoCo's outer-loop formulas against hand computation and torch's own Nesterov SGD."""

import pytest
import torch

from cairn.train import diloco


def test_weighted_average_by_tokens():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    avg = diloco.weighted_average([a, b], [100, 300])
    torch.testing.assert_close(avg["w"], torch.tensor([2.5, 5.0]))


def test_outer_step_matches_torch_nesterov_sgd():
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(3)]
    ref = torch.nn.Parameter(w0.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    outer = diloco.OuterOptimizer(lr=0.7, momentum=0.9)
    weights = {"w": w0.clone()}
    for g in grads:
        ref.grad = g.clone()
        sgd.step()
        weights = outer.step(weights, {"w": g})
    torch.testing.assert_close(weights["w"], ref.detach())


def test_pseudo_gradient_with_outer_lr_1_and_no_momentum_is_plain_averaging():
    start = {"w": torch.zeros(3)}
    ends = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0])}]
    avg = diloco.weighted_average([diloco.pseudo_gradient(start, e) for e in ends], [1, 1])
    out = diloco.OuterOptimizer(lr=1.0, momentum=0.0).step(start, avg)
    torch.testing.assert_close(out["w"], torch.tensor([0.5, 0.5, 0.0]))


def test_compression_sizes_and_error():
    delta = {"m": torch.randn(64, 32) * 1e-3, "v": torch.randn(32) * 1e-3}
    shapes = {k: v.shape for k, v in delta.items()}
    sizes = {d: diloco.payload_bytes(diloco.compress(delta, d)) for d in ("fp32", "bf16", "int8", "int4")}
    assert sizes["fp32"] == 4 * (64 * 32 + 32) and sizes["bf16"] == sizes["fp32"] // 2
    assert sizes["int8"] == 65 * (32 + 2) and sizes["int4"] == 65 * (16 + 2)  # rows of 32: one block, no outlier
    for d, tol in (("fp32", 0), ("bf16", 1e-2), ("int8", 1e-2), ("int4", 0.2)):
        back = diloco.decompress(diloco.compress(delta, d), shapes)
        for k in delta:
            assert back[k].shape == delta[k].shape
            assert (back[k] - delta[k]).abs().max() <= tol * delta[k].abs().max() + 1e-12


@pytest.mark.parametrize("dtype, levels", [("int8", 127), ("int4", 7)])
def test_compressed_broadcast_keeps_receivers_bit_identical_and_loses_no_update(dtype, levels):
    torch.manual_seed(0)
    start = {"w": torch.randn(8, 256), "b": torch.randn(256)}
    sender = diloco.Broadcast(dtype)
    held_by_driver = {k: v.clone() for k, v in start.items()}
    held_by_worker = {k: v.clone() for k, v in start.items()}
    total = {k: torch.zeros_like(v) for k, v in start.items()}  # the sum of every outer update asked for
    gaps = []
    for _ in range(20):
        update = {k: -0.05 * torch.randn_like(v) for k, v in start.items()}  # an outer step from the held weights
        total = {k: total[k] + update[k] for k in total}
        new = {k: held_by_driver[k] + update[k] for k in update}
        payload, held_by_driver = sender.step(held_by_driver, new)
        held_by_worker = diloco.apply_update(held_by_worker, payload)
        for k in start:
            assert torch.equal(held_by_worker[k], held_by_driver[k])  # every side rebuilds the same weights
        assert diloco.payload_bytes(payload) < 0.3 * sum(v.numel() * 4 for v in start.values())
        gaps.append(max((held_by_driver[k] - (start[k] + total[k])).abs().max().item() for k in start))
    # error feedback: what rounding held back is sent in later rounds, so the weights stay within about one
    # round's rounding (errors near half a step, a step being max|change in the block| / 127 or / 7; changes
    # here reach ~0.25) of every update applied in full, over 20 rounds; the residual is exactly what is still owed
    assert max(gaps) < 2 * 0.25 / (2 * levels), gaps
    for k in start:
        torch.testing.assert_close(held_by_driver[k] + sender.residual[k], start[k] + total[k], atol=1e-5, rtol=0)
