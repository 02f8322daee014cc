"""`cispo.weight_sync.checksum`: the exact weight fingerprint the GPU tests compare a
trainer with its engines by (the engine side: tests/rollout/test_rollout_ray.py)."""

import torch

from cispo.weight_sync import checksum

SEED = 1234


def test_checksum_is_exact_and_order_free():
    print(f"seed {SEED}")
    g = torch.Generator().manual_seed(SEED)
    t = torch.randn(1000, 7, generator=g)
    assert checksum(t) == checksum(t.clone()) == checksum(t, chunk=333)  # chunked sums agree exactly
    flipped = t.clone()
    flipped.view(-1).view(torch.int32)[4321] ^= 1  # one mantissa bit
    assert checksum(flipped) != checksum(t)
    swapped = t.clone().view(-1)
    swapped[[10, 20]] = swapped[[20, 10]]
    assert checksum(swapped) != checksum(t)
    b = t.to(torch.bfloat16)
    assert checksum(b) == checksum(b.float().to(torch.bfloat16)) and checksum(b) != checksum(b.float())
