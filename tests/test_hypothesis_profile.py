"""The property tests draw the same examples on every run unless HYPOTHESIS_PROFILE=random
(tests/conftest.py): a CI failure reproduces locally, and a pass means the same everywhere."""

import os

import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _draws() -> list:
  seen = []

  @settings(max_examples=20, database=None)
  @given(st.lists(st.integers(-10**6, 10**6), max_size=8))
  def record(xs):
    seen.append(tuple(xs))

  record()
  return seen


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "fixed") != "fixed",
                    reason="HYPOTHESIS_PROFILE asks for random examples")
def test_fixed_profile_draws_the_same_examples_every_run():
  assert hypothesis.settings.default.derandomize
  first, second = _draws(), _draws()
  assert len(first) == 20 and first == second
