"""benchmarks/bench_memory.py: the activation count behind the GPU preset's batch size."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

from simclr_path.config import load_config


def test_activation_memory_scales_with_view_area_and_counts_local_crops():
    bench = load_benchmark("bench_memory")

    def est(size, local=0, amp="fp32"):
        cfg = load_config(overrides={"model": {"arch": "test_resnet"}, "train": {"optimizer": "adamw"},
                                     "augment": {"image_size": size, "local_crops": local,
                                                 "local_size": 32 if local else None}})
        return bench.estimate(cfg, amp)

    small, big = est(32), est(64)
    assert small["per_image_global"] > 0 and small["per_pair"] == pytest.approx(2 * small["per_image_global"])
    assert big["per_image_global"] / small["per_image_global"] == pytest.approx(4, rel=0.15)
    crops = est(64, local=2)
    assert crops["per_pair"] == pytest.approx(big["per_pair"] + 2 * small["per_image_global"], rel=0.05)
    assert est(64, amp="bf16")["per_image_global"] < 0.75 * big["per_image_global"]  # half-size activations
    assert small["model_state"] == small["params"] * 4 * 4  # weights, gradients, two AdamW moments
