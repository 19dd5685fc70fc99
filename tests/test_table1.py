"""The Table 1 command's pieces that need no training: budget profiles, CI overlap, paper numbers."""

import pytest

from sda.data import BENCHMARKS
from sweeps.table1 import PAPER, overlap, profile_overrides


def test_every_benchmark_has_the_papers_numbers():
    assert set(PAPER) == set(BENCHMARKS)
    assert PAPER["rect"]["SdA-3"] == (1.99, 0.12) and PAPER["convex"]["SAA-3"] == (18.41, 0.34)


def test_reduced_profile_cuts_every_layer_and_fine_tuning_and_full_changes_nothing():
    assert profile_overrides("full", ["layer1", "layer2"]) == {}
    reduced = profile_overrides("reduced", ["layer1", "layer2", "layer3"])
    assert {k for k in reduced if k.startswith("pretrain.")} == {f"pretrain.layer{i}.epochs" for i in (1, 2, 3)}
    assert reduced["finetune.max_epochs"] < 30


@pytest.mark.parametrize("ours, theirs, expected", [
    ((2.80, 0.14), (2.80, 0.14), True),
    ((3.00, 0.10), (2.80, 0.14), True),   # 0.20 apart, half-widths sum to 0.24
    ((3.10, 0.10), (2.80, 0.14), False),  # 0.30 apart
])
def test_confidence_intervals_overlap_when_closer_than_their_half_widths(ours, theirs, expected):
    assert overlap(ours, theirs) is expected
