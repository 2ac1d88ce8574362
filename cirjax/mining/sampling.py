"""QuRe negative sampling: one negative per query per step, reproducible and resumable.

The reference samples on the host (docs/reference_semantics.md#sampling):

* warm-up (before the first mining): a uniformly random entry of the pool whose image id
  differs from the target's, drawn afresh for every sample;
* after a mining, `sampling="walk"` (the reference code, the default): each query walks its
  set **without replacement** across epochs -- a random draw among the members not used since
  the last reset; when all have been used the history resets; a new mining resets every
  history. `sampling="uniform"` (the paper's text): a fresh uniform draw from the set;
* a query whose set is empty (see `cirjax.mining`) falls back to the warm-up draw.

Walking without replacement is walking a uniformly random permutation of the set, one pass
after another. Here that permutation is a function of `(seed, mining generation, query id,
pass)`: member `j` gets the random word `bits(fold_in(key, j))` and the pass visits members
in increasing word order (ties by `j`). The only mutable state is how many draws each query
has made since the last mining, so a checkpoint of `SamplerState` resumes the exact sequence,
and the permutation does not depend on which batch (or padded width) a query is drawn in.
Uniform and warm-up draws use `fold_in(seed, epoch, step, batch row)`.

Every draw is vectorised over the batch in `jax.jit`-compiled functions (padded to power-of-
two widths so only a handful of shapes ever compile); the bookkeeping is numpy on the host.

A training run whose queries mine against several corpora (FashionIQ's categories: one
mining group each, `cirjax.mining.groups`) draws through `GroupSampler`, one
`NegativeSampler` per group, holding every group's state at the start of an epoch.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cirjax.mining.groups import MiningGroup
from cirjax.mining.sets import HardNegativeSets, WholeCorpusSets, whole_corpus_sets

SAMPLING_MODES = ("walk", "uniform")

# fold_in tags that keep the key streams of different purposes apart.
_TAG_WALK = 1
_TAG_DRAW = 2
_TAG_WARMUP = 3


class SamplerState(NamedTuple):
  """Checkpointable sampler state (a pytree of numpy arrays).

  `generation` is the number of minings so far (0: warm-up, no sets yet). `uses[q]` counts
  query q's draws from its set since the last mining. `offsets`/`indices` are the current
  sets in the ragged contract of `HardNegativeSets` (empty arrays during warm-up).
  """
  generation: np.ndarray  # int64 scalar
  uses: np.ndarray        # int64 [Q]
  offsets: np.ndarray     # int64 [Q+1]
  indices: np.ndarray     # int32 [M]


def _bucket(n: int, minimum: int = 8) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("width",))
def _walk_ranks(seed, generation, query, pass_index, pos, size, *, width: int):
  """Member (index into the set) at position `pos` of each row's permutation.

  Row r's permutation orders `j < size[r]` by `bits(fold_in(k_r, j))`, ties by j, with
  `k_r = fold_in(seed, WALK, generation, query[r], pass[r])`; `width` >= max(size) pads.
  """
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TAG_WALK), generation)

  def row(q, p, at, n):
    k = jax.random.fold_in(jax.random.fold_in(base, q), p)
    j = jnp.arange(width, dtype=jnp.int32)
    words = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(k, i), dtype=jnp.uint32))(j)
    # Sort by (word, j); padding (j >= n) gets the largest word and a larger j: last.
    words = jnp.where(j < n, words, jnp.uint32(0xFFFFFFFF))
    _, perm = jax.lax.sort((words, j), num_keys=2)
    return perm[at]

  return jax.vmap(row)(query, pass_index, pos, size)


@jax.jit
def _uniform_below(seed, epoch, step, rows, size):
  """A uniform integer in [0, size[r]) per row, from fold_in(seed, DRAW, epoch, step, row)."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TAG_DRAW), epoch)
  base = jax.random.fold_in(base, step)

  def row(r, n):
    return jax.random.randint(jax.random.fold_in(base, r), (), 0, jnp.maximum(n, 1))

  return jax.vmap(row)(rows, size).astype(jnp.int32)


@jax.jit
def _warmup_draw(seed, epoch, step, rows, pool_ids, target_ids):
  """A uniformly random pool entry whose id differs from the row's target id (rejection
  sampling: exact, and the expected number of rounds is N / (N - copies of the target))."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TAG_DRAW), epoch)
  base = jax.random.fold_in(jax.random.fold_in(base, step), _TAG_WARMUP)
  n = pool_ids.shape[0]

  def row(r, tid):
    k = jax.random.fold_in(base, r)

    def cond(c):
      return pool_ids[c[1]] == tid

    def body(c):
      attempt = c[0] + 1
      return attempt, jax.random.randint(jax.random.fold_in(k, attempt), (), 0, n)

    first = jax.random.randint(jax.random.fold_in(k, 0), (), 0, n)
    _, idx = jax.lax.while_loop(cond, body, (jnp.int32(0), first))
    return pool_ids[idx]

  return jax.vmap(row)(rows, target_ids)


class NegativeSampler:
  """Draws one negative per query for QuRe's pairwise loss.

  Args:
    pool: the warm-up pool, `cirjax.mining.whole_corpus_sets(target_index, image_ids=...)`
      (or `corpus_size=`): the pool's ids and each query's target id.
    seed: the run's seed (the reference uses 1000).
    sampling: `"walk"` (without replacement across epochs, reference code) or `"uniform"`.

  Negatives are image ids when the pool has image ids, else corpus positions -- the same
  space as the mined sets'. The sampler object holds only constants; the evolving part is
  the `SamplerState` it returns, which the trainer checkpoints.

  In a multi-process run call `sample` with the *global* batch's query ids on every process
  (it is cheap) and keep this process's rows, so every process holds the same state.
  """

  def __init__(self, pool: WholeCorpusSets, *, seed: int = 1000, sampling: str = "walk"):
    if sampling not in SAMPLING_MODES:
      raise ValueError(f"sampling={sampling!r}; expected one of {SAMPLING_MODES}")
    if not isinstance(pool, WholeCorpusSets):
      raise ValueError("pool must be a cirjax.mining.WholeCorpusSets "
                       f"(from whole_corpus_sets), got {type(pool).__name__}")
    self.pool = pool
    self.seed = int(seed)
    self.sampling = sampling
    self._pool_dev = jnp.asarray(pool.pool_ids, jnp.int32)

  @property
  def num_queries(self) -> int:
    return self.pool.num_queries

  # --- state

  def init(self) -> SamplerState:
    """Warm-up state: no sets yet, every draw comes from the pool."""
    q = self.num_queries
    return SamplerState(generation=np.int64(0), uses=np.zeros(q, np.int64),
                        offsets=np.zeros(q + 1, np.int64), indices=np.zeros(0, np.int32))

  def set_mined(self, state: SamplerState, sets: HardNegativeSets) -> SamplerState:
    """New sets from a mining: every history resets, the generation advances."""
    if sets.num_queries != self.num_queries:
      raise ValueError(f"sets has {sets.num_queries} queries, the sampler "
                       f"{self.num_queries}")
    return SamplerState(generation=np.int64(int(state.generation) + 1),
                        uses=np.zeros(self.num_queries, np.int64),
                        offsets=np.asarray(sets.offsets, np.int64),
                        indices=np.asarray(sets.indices, np.int32))

  def validate(self, state: SamplerState) -> None:
    """Raises ValueError if a (restored) state does not fit this sampler."""
    q = self.num_queries
    if np.shape(state.uses) != (q,) or np.shape(state.offsets) != (q + 1,):
      raise ValueError(f"sampler state is for {np.shape(state.uses)} queries, the sampler "
                       f"has {q} (was it saved by another dataset?)")
    if int(state.offsets[-1]) != len(state.indices) or np.any(np.diff(state.offsets) < 0):
      raise ValueError("sampler state: offsets and indices are inconsistent")

  # --- drawing

  def sample(self, state: SamplerState, query_ids, *, epoch: int, step: int
             ) -> tuple[np.ndarray, SamplerState]:
    """One negative per entry of `query_ids` (a query may repeat within the batch).

    Returns `(negatives [B] int32, new state)`. The key of every draw is derived by
    `fold_in` from (seed, epoch, step, row) -- warm-up and uniform draws -- or (seed,
    generation, query, pass) -- walk draws -- so replaying from a restored state gives the
    same negatives.
    """
    q = np.asarray(query_ids)
    if q.ndim != 1:
      raise ValueError(f"query_ids must be 1-D, got shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= self.num_queries):
      bad = int(np.nonzero((q < 0) | (q >= self.num_queries))[0][0])
      raise ValueError(f"query_ids[{bad}] = {int(q[bad])} is out of range for "
                       f"{self.num_queries} queries")
    q = q.astype(np.int64)
    b = len(q)
    out = np.zeros(b, np.int32)
    if b == 0:
      return out, state
    rows = np.arange(b, dtype=np.int32)
    sizes = state.offsets[q + 1] - state.offsets[q]   # all zero during warm-up
    has_set = sizes > 0
    fallback = ~has_set
    if has_set.any():
      if self.sampling == "walk":
        # Position in the walk = draws so far + earlier copies of the query in this batch.
        qs = q[has_set]
        order = np.argsort(qs, kind="stable")
        sq = qs[order]
        first = np.searchsorted(sq, sq, side="left")
        earlier = np.empty_like(order)
        earlier[order] = np.arange(len(sq)) - first
        draw = state.uses[qs] + earlier
        n = sizes[has_set]
        local = np.asarray(_walk_ranks(
            np.uint32(self.seed), np.uint32(int(state.generation)),
            _pad(qs, np.uint32), _pad(draw // n, np.uint32),
            _pad(draw % n, np.int32), _pad(n, np.int32), width=_bucket(n.max())))[:len(qs)]
      else:
        n = sizes[has_set]
        local = np.asarray(_uniform_below(
            np.uint32(self.seed), np.uint32(epoch), np.uint32(step),
            _pad(rows[has_set], np.int32), _pad(n, np.int32)))[:int(has_set.sum())]
      out[has_set] = state.indices[state.offsets[q[has_set]] + local]
    if fallback.any():
      out[fallback] = np.asarray(_warmup_draw(
          np.uint32(self.seed), np.uint32(epoch), np.uint32(step),
          _pad(rows[fallback], np.int32),
          # Padded rows get target id -1 (never a pool id): accepted at the first draw.
          self._pool_dev, _pad(self.pool.target_ids[q[fallback]], np.int32, fill=-1))
      )[:int(fallback.sum())]
    return out, self.advance(state, q)

  def advance(self, state: SamplerState, query_ids) -> SamplerState:
    """The state after one draw for each entry of `query_ids`, without drawing: what
    `sample` returns as its new state. Only walks count draws (uniform and warm-up draws
    leave the state as it is)."""
    q = np.asarray(query_ids).astype(np.int64)
    if self.sampling != "walk" or not q.size:
      return state
    q = q[state.offsets[q + 1] - state.offsets[q] > 0]
    if not q.size:
      return state
    uses = state.uses.copy()
    np.add.at(uses, q, 1)
    return state._replace(uses=uses)


def _pad(x: np.ndarray, dtype, fill: int = 0) -> np.ndarray:
  """Pads a batch vector to a power-of-two length so few shapes compile."""
  x = np.asarray(x).astype(dtype)
  n = _bucket(len(x))
  if n == len(x):
    return x
  return np.concatenate([x, np.full(n - len(x), fill, dtype)])


def state_to_arrays(state: SamplerState) -> dict[str, np.ndarray]:
  """Flat dict of numpy arrays (for the trainer's host-state checkpoint)."""
  return {f"sampler/{k}": np.asarray(v) for k, v in state._asdict().items()}


def state_from_arrays(arrays: dict[str, np.ndarray]) -> SamplerState:
  """Inverse of `state_to_arrays`; raises ValueError naming a missing key."""
  vals = {}
  for k in SamplerState._fields:
    key = f"sampler/{k}"
    if key not in arrays:
      raise ValueError(f"sampler state: missing array {key!r}")
    vals[k] = np.asarray(arrays[key])
  return SamplerState(generation=np.int64(vals["generation"]),
                      uses=vals["uses"].astype(np.int64),
                      offsets=vals["offsets"].astype(np.int64),
                      indices=vals["indices"].astype(np.int32))


class GroupSampler:
  """QuRe's negatives for queries spread over mining groups: one `NegativeSampler` per
  group, holding each group's state at the start of epoch `epoch`."""

  def __init__(self, groups: list[MiningGroup], num_queries: int, seed: int, sampling: str):
    self.samplers = [NegativeSampler(
        whole_corpus_sets(g.target_pos, image_ids=g.corpus), seed=seed,
        sampling=sampling) for g in groups]
    self.states = [smp.init() for smp in self.samplers]
    self.epoch: int | None = 0   # None: restored from a checkpoint that stored every draw
    self.q_group = np.zeros(num_queries, np.int32)     # query -> its group
    self.q_in_group = np.zeros(num_queries, np.int32)  # query -> its row in the group
    for gi, g in enumerate(groups):
      self.q_group[g.queries] = gi
      self.q_in_group[g.queries] = np.arange(len(g.queries))

  def advance(self, epoch: int, epoch_rows: Callable[[int], np.ndarray],
              first_step_in_epoch: int) -> None:
    """Applies the draws of the epochs from `self.epoch` up to `epoch` (`epoch_rows(e)`: the
    queries drawn in epoch e; each is drawn at most once per epoch, so an epoch's draws
    never depend on each other)."""
    if self.epoch is None:
      if first_step_in_epoch:
        raise RuntimeError("this checkpoint's sampler state predates per-epoch sampler "
                           "states and cannot resume mid-epoch; resume from an epoch's end")
      self.epoch = epoch
    if epoch < self.epoch:
      raise RuntimeError(f"begin_epoch({epoch}) after epoch {self.epoch}")
    for e in range(self.epoch, epoch):
      rows = epoch_rows(e)
      self.states = [smp.advance(state, self.q_in_group[rows[self.q_group[rows] == gi]])
                     for gi, (smp, state) in enumerate(zip(self.samplers, self.states))]
    self.epoch = epoch

  def set_mined(self, sets: list[HardNegativeSets]) -> None:
    """Each group's new sets (in group order): every history resets."""
    self.states = [smp.set_mined(state, hs)
                   for smp, state, hs in zip(self.samplers, self.states, sets)]

  def sample(self, epoch: int, index: int, rows: np.ndarray) -> np.ndarray:
    """One negative image per query of the *global* batch `index` of `epoch` (every
    process draws the same), from the state at the start of `epoch`."""
    if self.epoch != epoch:
      raise RuntimeError(f"batch of epoch {epoch} asked before begin_epoch({epoch})")
    neg = np.zeros(len(rows), np.int32)
    for gi, (smp, state) in enumerate(zip(self.samplers, self.states)):
      sel = self.q_group[rows] == gi
      if sel.any():
        neg[sel], _ = smp.sample(state, self.q_in_group[rows[sel]], epoch=epoch,
                                 step=index * len(self.samplers) + gi)
    return neg

  def to_arrays(self) -> dict[str, np.ndarray]:
    """Every group's state as flat arrays (the trainer's host-state checkpoint)."""
    arrays = {}
    for gi, state in enumerate(self.states):
      # "/" is a path separator to orbax: store sampler keys with "." instead.
      arrays.update({f"group{gi}." + k.replace("/", "."): v
                     for k, v in state_to_arrays(state).items()})
    return arrays

  def load(self, epoch: int | None, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `to_arrays`, each state validated against its group's sampler."""
    states = []
    for gi, smp in enumerate(self.samplers):
      pre = f"group{gi}."
      state = state_from_arrays({k[len(pre):].replace(".", "/"): v
                                              for k, v in arrays.items() if k.startswith(pre)})
      smp.validate(state)
      states.append(state)
    self.states, self.epoch = states, epoch


__all__ = ["NegativeSampler", "GroupSampler", "SamplerState", "SAMPLING_MODES",
           "state_to_arrays", "state_from_arrays"]
