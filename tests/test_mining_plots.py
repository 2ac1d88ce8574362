"""cirjax.mining.plots writes real PNGs and marks what the mining found."""

import numpy as np
import pytest
from PIL import Image

from cirjax import mining
from cirjax.mining import plots as mining_plots


def _worked():
  s = np.array([[5, 4.9, 4.8, 3, 2.9, 2.8, 2.7, 1, 0.9],
                [9, 8, 7, 6, 5, 4, 3, 2, 1]], np.float32)
  t = np.array([1, 8])
  sets, stats = mining.hard_negative_sets(s, t)
  return s, t, sets, stats


def test_score_curves_png_marks_target_and_gaps(tmp_path):
  s, t, _, stats = _worked()
  out = tmp_path / "curves.png"
  drawn = mining_plots.plot_score_curves(s, t, stats, [0, 1], out)
  with Image.open(out) as img:
    assert img.format == "PNG" and img.size[0] > 400
  # The worked example of docs/mining.md: target rank 1, gaps after ranks 2 and 6.
  assert drawn[0] == {"query": 0, "target_rank": 1, "gap1": 2, "gap2": 6, "set_size": 4}
  # Query 1's target is last: no gaps, empty set, still drawn.
  assert drawn[1]["gap1"] == -1 and drawn[1]["set_size"] == 0


def test_set_size_histogram(tmp_path):
  sizes = np.array([0, 0, 3, 4, 4, 10, 25])
  out = tmp_path / "sizes.png"
  info = mining_plots.plot_set_size_histogram(sizes, out, bins=5)
  with Image.open(out) as img:
    assert img.format == "PNG"
  assert info["empty"] == 2 and info["counts"].sum() == 5
  np.testing.assert_allclose(info["mean"], sizes.mean())
  _, _, _, stats = _worked()
  info = mining_plots.plot_set_size_histogram(stats, tmp_path / "s2.png")
  assert info["empty"] == 1


def test_bad_inputs(tmp_path):
  s, t, _, stats = _worked()
  with pytest.raises(ValueError, match="row 5 is out of range"):
    mining_plots.plot_score_curves(s, t, stats, [5], tmp_path / "x.png")
  with pytest.raises(ValueError, match="at least one"):
    mining_plots.plot_score_curves(s, t, stats, [], tmp_path / "x.png")
  with pytest.raises(ValueError, match="non-empty 1-D"):
    mining_plots.plot_set_size_histogram(np.zeros((2, 2)), tmp_path / "x.png")
