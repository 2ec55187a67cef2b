"""Active-learning ranking (issue 16) on constructed cases: the most uncertain image by
construction comes first, and the diverse rule returns no two perceptual near-duplicates while
other candidates exist."""
from __future__ import annotations

import torch

from service.datasets.report import NEAR_DUPLICATE_BITS
from service.serving.suggestions import diverse, rank, uncertainty


def test_margin_and_entropy_put_the_most_uncertain_first():
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # sure
        [0.34, 0.33, 0.33],  # the most uncertain by both measures
        [0.50, 0.45, 0.05],  # a close call between two classes: small margin, lower entropy
        [0.70, 0.20, 0.10],
    ])
    feats = torch.eye(4)
    hashes = [None] * 4
    assert rank("margin", probs, feats, hashes, 4) == [1, 2, 3, 0]
    assert rank("entropy", probs, feats, hashes, 4) == [1, 2, 3, 0]
    assert rank("margin", probs, feats, hashes, 2) == [1, 2]
    margin, entropy = uncertainty(probs)
    assert abs(float(margin[1]) - 0.01) < 1e-6
    assert int(entropy.argmax()) == 1


def test_multi_label_uncertainty_is_per_label():
    probs = torch.tensor([[0.99, 0.01], [0.52, 0.95], [0.2, 0.1]])
    margin, _ = uncertainty(probs, multi_label=True)
    assert int(margin.argmin()) == 1  # its first label is a coin toss


def _hash(bits: int) -> str:
    return f"{bits:016x}"


def test_diverse_returns_no_near_duplicates_while_others_exist():
    """Ten near-copies of one picture (features close, hashes a bit or two apart) are the most
    uncertain images; eight distinct pictures are less so. k = 6 takes one copy and five others."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=gen)
    copies = torch.stack([base + 0.01 * torch.randn(16, generator=gen) for _ in range(10)])
    others = torch.randn(8, 16, generator=gen)
    feats = torch.cat([copies, others])
    margin = torch.cat([torch.linspace(0.01, 0.05, 10), torch.linspace(0.3, 0.6, 8)]).double()
    root = 0x0F0F_F0F0_AAAA_5555
    hashes = [_hash(root ^ (1 << i)) for i in range(10)]  # each 1-2 bits from the others
    hashes += [_hash(root ^ ((0xFFFF << (16 * (i % 4))) ^ (0xFF << (8 * i)))) for i in range(8)]
    order = diverse(margin, feats, hashes, 6)
    assert len(order) == 6 and len(set(order)) == 6
    assert order[0] == 0  # the most uncertain first
    chosen = [int(hashes[i], 16) for i in order]
    for a in range(len(chosen)):
        for b in range(a + 1, len(chosen)):
            assert (chosen[a] ^ chosen[b]).bit_count() > NEAR_DUPLICATE_BITS, (order, a, b)
    assert sum(1 for i in order if i < 10) == 1
    # asked for more than the distinct pictures: near-duplicates only once nothing else is left
    everything = diverse(margin, feats, hashes, 18)
    assert sorted(everything) == list(range(18))
    first_copy_again = next(p for p, i in enumerate(everything) if i < 10 and p > 0)
    assert all(i >= 10 for i in everything[1:first_copy_again]) and first_copy_again == 9


def test_diverse_spreads_over_the_feature_space():
    """Two tight clusters and no hashes: the second pick comes from the other cluster."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 8, generator=gen) * 5
    b = -a
    feats = torch.cat([a + 0.01 * torch.randn(20, 8, generator=gen), b + 0.01 * torch.randn(20, 8, generator=gen)])
    margin = torch.linspace(0.0, 0.5, 40).double()  # cluster a is the more uncertain
    order = diverse(margin, feats, [None] * 40, 2)
    assert order[0] == 0 and order[1] >= 20
