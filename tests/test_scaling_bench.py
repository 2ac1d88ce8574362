"""The DP/FSDP estimate's formulas, and (slow) the fake-device scaling run of the QuRe step."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scaling_estimate as est  # noqa: E402


def test_ring_formulas():
  gb = 1e9
  assert est.ring_time("all_reduce", gb, 1, 100e9) == 0.0
  # 2 (N-1)/N B / bw + 2 log2 N alpha
  assert est.ring_time("all_reduce", gb, 8, 100e9, alpha=0) == pytest.approx(2 * 7 / 8 * 0.01)
  assert est.ring_time("all_gather", gb, 4, 100e9, alpha=1e-5) == pytest.approx(
      3 / 4 * 0.01 + 4 * 1e-5)
  with pytest.raises(KeyError):
    est.ring_time("broadcast", gb, 4, 1e9)


def test_efficiency_falls_across_nodes_and_with_less_compute():
  w = est.Workload("w", 0.01, "test", trainable_params=100_000_000, sharded_params=100_000_000)
  in_node = est.estimate(w, 8, "dp")
  across = est.estimate(w, 64, "dp")
  assert in_node["busbw_gb_s"] > across["busbw_gb_s"]
  assert across["efficiency"] < in_node["efficiency"] <= 1.0
  no_overlap = est.estimate(w, 64, "dp", overlap=0.0)
  assert no_overlap["efficiency"] == pytest.approx(0.01 / (0.01 + no_overlap["comm_ms"] / 1e3))
  big = est.Workload("w", 1.0, "test", 100_000_000, 100_000_000)
  assert est.estimate(big, 64, "dp")["efficiency"] > across["efficiency"]
  with pytest.raises(ValueError, match="unknown strategy"):
    est.estimate(w, 8, "tp")


def test_analytic_flops_scale():
  assert est.qure_step_flops(2) == pytest.approx(2 * est.qure_step_flops(1))
  assert est.qure_step_flops(1, cached_features=True) < est.qure_step_flops(1)
  # ViT-L/14 at 224: ~ 2 * 300M params * 257 tokens ~ 155 GFLOPs + attention.
  assert 150e9 < est.vit_forward_flops() < 175e9


def test_estimate_rows_label_their_source(tmp_path):
  import bench_scaling  # pylint: disable=g-import-not-at-top
  rows = bench_scaling.estimate_rows(tmp_path)
  assert {r["gpus"] for r in rows} == {8, 64, 256}
  assert all(r["step_source"].startswith("modelled") for r in rows)
  assert all(0 < r["efficiency"] <= 1 for r in rows)


@pytest.mark.slow
def test_fake_device_run_matches_one_device():
  import bench_scaling  # pylint: disable=g-import-not-at-top
  out = bench_scaling.run("cpu", quick=True)
  assert out["rows"] and all(r["loss_matches_1_device"] for r in out["rows"])
  assert {r["devices"] for r in out["rows"]} == {1, 2, 4}
