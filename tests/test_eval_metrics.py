"""The localisation benchmark's metrics on hand-made maps whose answers are known."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from localization import metrics  # noqa: E402
from localization.data import make_canvases  # noqa: E402


def box(H, W, y0, x0, y1, x1):
    m = torch.zeros(1, H, W, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m


def peak(H, W, y, x, value=1.0):
    m = torch.zeros(1, H, W)
    m[0, y, x] = value
    return m


def test_pointing_inside_outside_and_tolerance():
    mask = box(20, 20, 5, 5, 10, 10)
    assert metrics.pointing_hits(peak(20, 20, 7, 7), mask).item()
    assert not metrics.pointing_hits(peak(20, 20, 15, 15), mask).item()
    # 3 px right of the box: a miss without tolerance, a hit with 3, a miss with 2
    assert not metrics.pointing_hits(peak(20, 20, 7, 12), mask, tolerance=2).item()
    assert metrics.pointing_hits(peak(20, 20, 7, 12), mask, tolerance=3).item()
    # diagonal distance is Euclidean: (12, 12) is sqrt(3²+3²) ≈ 4.24 from the corner (9, 9)
    assert not metrics.pointing_hits(peak(20, 20, 12, 12), mask, tolerance=4).item()
    assert metrics.pointing_hits(peak(20, 20, 12, 12), mask, tolerance=5).item()


def test_pointing_needs_positive_evidence():
    mask = box(8, 8, 0, 0, 8, 8)
    assert not metrics.pointing_hits(torch.zeros(1, 8, 8), mask).item()
    assert not metrics.pointing_hits(-torch.ones(1, 8, 8), mask).item()


def test_pointing_is_per_sample():
    masks = torch.cat([box(10, 10, 0, 0, 3, 3), box(10, 10, 6, 6, 10, 10)])
    maps = torch.cat([peak(10, 10, 1, 1), peak(10, 10, 1, 1)])
    assert metrics.pointing_hits(maps, masks).tolist() == [True, False]


def test_discriminative_pointing_and_mass_share():
    a, b = box(20, 20, 0, 0, 6, 6), box(20, 20, 10, 10, 16, 16)
    at_a = peak(20, 20, 2, 2)
    at_b = peak(20, 20, 12, 12)
    assert metrics.discriminative_hits(at_a, a, b).item()
    assert not metrics.discriminative_hits(at_b, a, b).item()
    # a tolerance that reaches A does not excuse a maximum inside B
    assert not metrics.discriminative_hits(at_b, a, b, tolerance=30).item()
    both = at_a * 3 + at_b  # three quarters of the positive mass in A
    assert metrics.mass_share(both, a, b).item() == pytest.approx(0.75)
    assert metrics.mass_share(both - 10 * at_b, a, b).item() == pytest.approx(1.0)  # negative mass does not count
    assert torch.isnan(metrics.mass_share(torch.zeros(1, 20, 20), a, b)).all()


def test_iou_of_exact_partial_and_empty_maps():
    mask = box(10, 10, 2, 2, 6, 6)  # 16 px
    assert metrics.iou(mask.float(), mask).item() == pytest.approx(1.0)
    half = box(10, 10, 2, 2, 6, 4).float()  # 8 px inside
    assert metrics.iou(half, mask).item() == pytest.approx(0.5)
    outside = box(10, 10, 7, 7, 10, 10).float()
    assert metrics.iou(outside, mask).item() == 0.0
    assert metrics.iou(torch.zeros(1, 10, 10), mask).item() == 0.0
    # weak positive noise below the mean is not selected
    noisy = mask.float() + 0.01 * torch.rand(1, 10, 10)
    assert metrics.iou(noisy, mask).item() == pytest.approx(1.0)


def test_relevance_order_ranks_highest_first_and_breaks_ties_by_seed():
    m = torch.tensor([[[0.0, 3.0], [1.0, 0.0]]])
    r = metrics.relevance_order(m, seed=0)
    assert r[0, 1].item() == 0 and r[0, 2].item() == 1
    assert sorted(r[0].tolist()) == [0, 1, 2, 3]
    tie_orders = {tuple(metrics.relevance_order(torch.zeros(1, 4, 4), seed=s)[0].tolist()) for s in range(5)}
    assert len(tie_orders) > 1


def _pixel_model():
    """Score = mean of the pixels in the top-left 2×2 corner (a probability for inputs in [0, 1])."""
    return lambda x, t: x[:, 0, :2, :2].flatten(1).mean(1)


def test_deletion_and_insertion_reward_the_right_ranking():
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, :2, :2] = 1.0
    good = img[:, 0].clone()  # exactly the pixels the score depends on
    bad = 1.0 - good
    base = torch.zeros_like(img)
    target = torch.zeros(1, dtype=torch.long)
    kw = dict(score=_pixel_model(), images=img, target=target, baseline=base, steps=4)
    del_good = metrics.perturbation_curves(maps=good, mode="deletion", **kw)
    del_bad = metrics.perturbation_curves(maps=bad, mode="deletion", **kw)
    ins_good = metrics.perturbation_curves(maps=good, mode="insertion", **kw)
    assert del_good[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert del_bad[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert ins_good[0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert metrics.auc(del_good).item() == pytest.approx(0.125)
    assert metrics.auc(del_bad).item() == pytest.approx(0.875)
    assert metrics.auc(ins_good).item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="mode"):
        metrics.perturbation_curves(maps=good, mode="sideways", **kw)


def test_spearman_of_same_reversed_and_constant_maps():
    a = torch.arange(16.0).view(1, 4, 4)
    assert metrics.spearman(a, a * 2 + 1).item() == pytest.approx(1.0)
    assert metrics.spearman(a, -a).item() == pytest.approx(-1.0)
    assert torch.isnan(metrics.spearman(a, torch.zeros(1, 4, 4))).all()


def test_canvases_are_reproducible_and_boxes_hold_the_digits():
    c1 = make_canvases(6, size=64, seed=3)
    c2 = make_canvases(6, size=64, seed=3)
    c3 = make_canvases(6, size=64, seed=4)
    assert torch.equal(c1.images, c2.images) and c1.boxes == c2.boxes
    assert not torch.equal(c1.images, c3.images)
    for i in range(6):
        assert 2 <= len(c1.boxes[i]) <= 4
        assert set(c1.boxes[i]) == set(torch.nonzero(c1.labels[i]).flatten().tolist())
        for cls in c1.boxes[i]:
            inside = c1.images[i, 0][c1.box_mask(i, cls)]
            assert inside.max() > 0.5  # ink inside every box
        for a in c1.boxes[i]:
            for b in c1.boxes[i]:
                if a != b:
                    assert not (c1.box_mask(i, a) & c1.box_mask(i, b)).any()  # boxes never overlap
