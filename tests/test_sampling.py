"""cirjax.mining.sampling: walks without replacement, uniform within a pass, exact resume."""

import numpy as np
import pytest
from scipy import stats as sps

from cirjax import mining
from cirjax.mining import sampling


def _sets(lists):
  sizes = [len(x) for x in lists]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  flat = np.concatenate([np.asarray(x, np.int32) for x in lists]) if lists else np.zeros(0)
  return mining.HardNegativeSets(offsets=offsets, indices=flat.astype(np.int32))


SETS = [[11, 12, 13, 14, 15], [], [20, 21], [30], list(range(40, 57))]
NQ = len(SETS)


def _sampler(sampling_mode="walk", seed=7):
  ids = np.arange(60)
  pool = mining.whole_corpus_sets([0, 1, 2, 3, 4], image_ids=ids)
  return sampling.NegativeSampler(pool, seed=seed, sampling=sampling_mode)


def test_walk_visits_every_member_once_per_pass():
  s = _sampler()
  st = s.set_mined(s.init(), _sets(SETS))
  seen = {q: [] for q in range(NQ)}
  # Query 0 drawn twice per batch, query 4 once: passes span several epochs and batches.
  for step in range(3 * 17):
    neg, st = s.sample(st, np.array([0, 4, 0, 2, 3]), epoch=step // 10, step=step)
    seen[0] += [neg[0], neg[2]]
    seen[4].append(neg[1])
    seen[2].append(neg[3])
    seen[3].append(neg[4])
  for q in (0, 2, 3, 4):
    m = len(SETS[q])
    draws = seen[q]
    for p in range(len(draws) // m):
      assert sorted(draws[p * m:(p + 1) * m]) == sorted(SETS[q]), (q, p)
  # Different passes use different orders (not one fixed permutation).
  passes = {tuple(seen[4][p * 17:(p + 1) * 17]) for p in range(3)}
  assert len(passes) == 3
  assert list(st.uses) == [102, 0, 51, 51, 51]


def test_empty_set_falls_back_to_warmup_pool_and_warmup_excludes_target():
  s = _sampler()
  st = s.init()
  draws = []
  for step in range(200):
    neg, st = s.sample(st, np.array([0, 1, 2, 3, 4]), epoch=0, step=step)
    draws.append(neg)
  draws = np.array(draws)
  for q in range(NQ):
    assert not (draws[:, q] == q).any()  # the target's own id is never drawn
  st = s.set_mined(st, _sets(SETS))
  neg = np.array([s.sample(st, np.array([1]), epoch=1, step=k)[0][0] for k in range(300)])
  assert (neg != 1).all() and len(np.unique(neg)) > 30  # query 1's set is empty


def test_warmup_with_repeated_ids_is_uniform_over_entries():
  # Pool entries with ids [0, 0, 1, 1, 1, 2]; target id 1: entries 0, 1, 5 each w.p. 1/3,
  # so ids 0 (two entries) and 2 (one entry) come with probabilities 2/3 and 1/3.
  pool = mining.whole_corpus_sets([2], image_ids=[0, 0, 1, 1, 1, 2])
  s = sampling.NegativeSampler(pool, seed=0)
  st = s.init()
  neg = np.concatenate([s.sample(st, np.zeros(64, int), epoch=0, step=k)[0]
                        for k in range(50)])
  counts = np.array([(neg == 0).sum(), (neg == 1).sum(), (neg == 2).sum()])
  assert counts[1] == 0
  p = sps.chisquare(counts[[0, 2]], f_exp=np.array([2, 1]) / 3 * len(neg)).pvalue
  assert p > 1e-3, counts


def test_walk_is_uniform_within_a_pass_chi_square():
  # For a 6-member set, the member drawn at each position of a pass is uniform over the
  # set, across minings (each mining is a fresh generation: a fresh permutation).
  s = _sampler(seed=123)
  m = 6
  lists = [list(range(100, 100 + m))] + [[]] * (NQ - 1)
  st = s.init()
  counts = np.zeros((m, m), int)  # [position in pass, member]
  for _ in range(600):
    st = s.set_mined(st, _sets(lists))
    neg, st = s.sample(st, np.zeros(m, int), epoch=0, step=0)
    counts[np.arange(m), neg - 100] += 1
  assert (counts.sum(1) == 600).all() and (counts.sum(0) == 600).all()
  for pos in range(m):
    assert sps.chisquare(counts[pos]).pvalue > 1e-3, (pos, counts[pos])


def test_uniform_mode_is_uniform_and_stateless():
  s = _sampler("uniform")
  st = s.set_mined(s.init(), _sets(SETS))
  neg = np.concatenate([s.sample(st, np.full(32, 4), epoch=2, step=k)[0] for k in range(60)])
  counts = np.bincount(neg - 40, minlength=17)
  assert sps.chisquare(counts).pvalue > 1e-3
  _, st2 = s.sample(st, np.array([4]), epoch=0, step=0)
  assert (st2.uses == 0).all()


@pytest.mark.parametrize("mode", ["walk", "uniform"])
def test_resume_from_checkpointed_state_is_exact(mode):
  s = _sampler(mode)
  st = s.set_mined(s.init(), _sets(SETS))
  batches = [np.array([k % NQ, (k + 2) % NQ, 4]) for k in range(12)]
  full = []
  for i, b in enumerate(batches):
    neg, st = s.sample(st, b, epoch=i // 4, step=i)
    full.append(neg)
    if i == 5:
      saved = sampling.state_to_arrays(st)
  # A fresh sampler object (a restarted process) continues from the saved arrays.
  s2 = _sampler(mode)
  st2 = sampling.state_from_arrays({k: v.copy() for k, v in saved.items()})
  s2.validate(st2)
  for i, b in enumerate(batches[6:], start=6):
    neg, st2 = s2.sample(st2, b, epoch=i // 4, step=i)
    np.testing.assert_array_equal(neg, full[i])


@pytest.mark.parametrize("mode", ["walk", "uniform"])
def test_advance_is_the_state_sample_returns(mode):
  """A trainer can apply an epoch's draws without drawing (QuRe's per-epoch sampler state)."""
  s = _sampler(mode)
  st = s.set_mined(s.init(), _sets(SETS))
  for i, b in enumerate([np.array([0, 4, 0, 1]), np.array([2, 3]), np.array([1])]):
    _, want = s.sample(st, b, epoch=0, step=i)
    got = s.advance(st, b)
    for k in sampling.SamplerState._fields:
      np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    st = got
  assert list(st.uses) == ([2, 0, 1, 1, 1] if mode == "walk" else [0] * NQ)
  warm = s.init()
  assert s.advance(warm, np.array([0, 1])) is warm


def test_seed_and_generation_change_the_walk():
  a = _sampler(seed=1)
  b = _sampler(seed=2)
  sa = a.set_mined(a.init(), _sets(SETS))
  sb = b.set_mined(b.init(), _sets(SETS))
  q = np.full(17, 4)
  na, _ = a.sample(sa, q, epoch=0, step=0)
  nb, _ = b.sample(sb, q, epoch=0, step=0)
  assert sorted(na) == sorted(nb) == list(range(40, 57)) and list(na) != list(nb)
  # Mining again resets the history: the new pass starts over with a new order.
  sa2 = a.set_mined(sa, _sets(SETS))
  nc, _ = a.sample(sa2, q, epoch=0, step=0)
  assert sorted(nc) == list(range(40, 57)) and list(nc) != list(na)


def test_bad_inputs():
  s = _sampler()
  st = s.init()
  with pytest.raises(ValueError, match=r"query_ids\[1\] = 9"):
    s.sample(st, np.array([0, 9]), epoch=0, step=0)
  with pytest.raises(ValueError, match="sampling="):
    _sampler("epoch")
  with pytest.raises(ValueError, match="sets has 2 queries"):
    s.set_mined(st, _sets([[1], [2]]))
  with pytest.raises(ValueError, match="missing array 'sampler/uses'"):
    sampling.state_from_arrays({"sampler/generation": np.int64(0)})
  bad = st._replace(uses=np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="sampler state is for"):
    s.validate(bad)
