"""cirjax.losses against hand-computed values, PyTorch, and across 1 vs 4 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax import losses

RTOL = 1e-5  # docs/reference_semantics.md#parity: fp32, single functions


def test_pairwise_sigmoid_hand_computed():
  pos = np.array([2.0, 0.0, -1.0], np.float32)
  neg = np.array([1.0, 0.0, 1.0], np.float32)
  want = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]
  got = losses.pairwise_sigmoid_loss(pos, neg, reduction="none")
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(losses.pairwise_sigmoid_loss(pos, neg), np.mean(want), rtol=RTOL)
  np.testing.assert_allclose(losses.pairwise_sigmoid_loss(pos, neg, reduction="sum"),
                             np.sum(want), rtol=RTOL)


def test_pairwise_sigmoid_is_stable_at_large_margins():
  pos = jnp.array([1e4, -1e4, 80.0, -80.0], jnp.float32)
  neg = jnp.zeros(4, jnp.float32)
  got = np.asarray(losses.pairwise_sigmoid_loss(pos, neg, reduction="none"))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, [0.0, 1e4, math.exp(-80.0), 80.0], rtol=RTOL, atol=0)
  g = jax.grad(lambda p: losses.pairwise_sigmoid_loss(p, neg))(pos)
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(g, [-0.0, -0.25, -0.25 * math.exp(-80.0), -0.25], atol=1e-7)


def test_pairwise_sigmoid_equals_reference_kl_formulation_in_torch():
  # The reference: logits [s+, s-] -> log_softmax -> KL to [1, 0], batchmean.
  rng = np.random.default_rng(0)
  pos = (rng.standard_normal(32) * 5).astype(np.float32)
  neg = (rng.standard_normal(32) * 5).astype(np.float32)
  logits = torch.stack([torch.from_numpy(pos), torch.from_numpy(neg)], dim=1)
  target = torch.tensor([[1.0, 0.0]]).expand(32, 2)
  ref = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
  got = losses.pairwise_sigmoid_loss(pos, neg)
  np.testing.assert_allclose(got, ref.item(), rtol=RTOL)
  # Several negatives per query: every (pos, neg) pair counts once.
  neg2 = rng.standard_normal((32, 3)).astype(np.float32)
  ref2 = -F.logsigmoid(torch.from_numpy(pos)[:, None] - torch.from_numpy(neg2)).mean()
  np.testing.assert_allclose(losses.pairwise_sigmoid_loss(pos, neg2), ref2.item(), rtol=RTOL)


def test_pairwise_sigmoid_bf16_inputs_computed_in_fp32():
  pos = jnp.array([3.0, 1.0], jnp.bfloat16)
  neg = jnp.array([1.0, 2.0], jnp.bfloat16)
  got = losses.pairwise_sigmoid_loss(pos, neg)
  assert got.dtype == jnp.float32
  want = np.mean([math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))])
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_qure_scores_max_over_tokens_over_temperature():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((4, 8)).astype(np.float32)
  t = rng.standard_normal((4, 32, 8)).astype(np.float32)
  want = np.array([max(t[b, k] @ q[b] for k in range(32)) for b in range(4)]) / 0.07
  np.testing.assert_allclose(losses.qure_scores(q, t, 0.07), want, rtol=RTOL)
  np.testing.assert_allclose(losses.qure_scores(q, t), want * 0.07, rtol=RTOL)


def test_qure_logits_score_every_pair_and_feed_cross_entropy():
  rng = np.random.default_rng(2)
  q = rng.standard_normal((3, 8)).astype(np.float32)
  t = rng.standard_normal((6, 4, 8)).astype(np.float32)
  want = np.array([[max(t[n, k] @ q[b] for k in range(4)) for n in range(6)]
                   for b in range(3)]) / 0.07
  got = losses.qure_logits(q, t, 0.07)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(np.diagonal(got[:, :3]), losses.qure_scores(q, t[:3], 0.07),
                             rtol=RTOL)
  ce = want - want.max(1, keepdims=True)
  ce = np.log(np.exp(ce).sum(1)) - np.diagonal(ce[:, :3])
  np.testing.assert_allclose(losses.info_nce_from_logits(got), ce.mean(), rtol=RTOL)
  with pytest.raises(ValueError, match="target_tokens"):
    losses.qure_logits(q, t[0], 0.07)
  with pytest.raises(ValueError, match="logits"):
    losses.info_nce_from_logits(got[:, :2])


def _torch_info_nce(q, t, tau, h=None, scope="batch", symmetric=False):
  """InfoNCE as the SimCSE/E5-V-style reference code writes it."""
  q, t = F.normalize(torch.from_numpy(q), dim=-1), F.normalize(torch.from_numpy(t), dim=-1)
  sim = q @ t.T
  if h is not None:
    h = F.normalize(torch.from_numpy(h), dim=-1)
    if scope == "batch":
      sim = torch.cat([sim, torch.einsum("id,jhd->ijh", q, h).reshape(len(q), -1)], 1)
    else:
      sim = torch.cat([sim, torch.einsum("id,ihd->ih", q, h)], 1)
  labels = torch.arange(len(q))
  loss = F.cross_entropy(sim / tau, labels)
  if symmetric:
    loss = 0.5 * (loss + F.cross_entropy((sim[:, :len(q)] / tau).T, labels))
  return loss.item()


def test_info_nce_hand_computed():
  # Orthonormal embeddings: logits = eye/tau; row loss = log(e^{1/tau} + (B-1)) - 1/tau.
  b, tau = 4, 0.5
  e = np.eye(b, dtype=np.float32)
  want = math.log(math.exp(1 / tau) + (b - 1)) - 1 / tau
  np.testing.assert_allclose(losses.info_nce_loss(e, e, temperature=tau), want, rtol=RTOL)
  # One hard negative per row equal to its own positive: one more e^{1/tau} in row i only
  # with scope "own"; with scope "batch" row i also sees the others' (orthogonal) ones.
  h = e.copy()
  own = math.log(2 * math.exp(1 / tau) + (b - 1)) - 1 / tau
  batch = math.log(2 * math.exp(1 / tau) + 2 * (b - 1)) - 1 / tau
  np.testing.assert_allclose(losses.info_nce_loss(e, e, temperature=tau, hard_negatives=h,
                                                  hard_negative_scope="own"), own, rtol=RTOL)
  np.testing.assert_allclose(losses.info_nce_loss(e, e, temperature=tau, hard_negatives=h),
                             batch, rtol=RTOL)


@pytest.mark.parametrize("scope", ["batch", "own"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_hard", [0, 1, 3])
def test_info_nce_matches_torch(scope, symmetric, num_hard):
  rng = np.random.default_rng(2)
  q = rng.standard_normal((6, 16)).astype(np.float32)
  # Loosely aligned pairs keep the loss O(1): a near-zero loss is pure cancellation.
  t = (q + 2.0 * rng.standard_normal((6, 16))).astype(np.float32)
  h = rng.standard_normal((6, num_hard, 16)).astype(np.float32) if num_hard else None
  ref = _torch_info_nce(q, t, 0.05, h, scope, symmetric)
  got = losses.info_nce_loss(q, t, temperature=0.05, hard_negatives=h,
                             hard_negative_scope=scope, symmetric=symmetric)
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_info_nce_gradients_match_torch():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((5, 8)).astype(np.float32)
  t = rng.standard_normal((5, 8)).astype(np.float32)
  h = rng.standard_normal((5, 8)).astype(np.float32)
  gq, gt, gh = jax.grad(lambda a, b, c: losses.info_nce_loss(a, b, hard_negatives=c),
                        argnums=(0, 1, 2))(q, t, h)
  tq, tt, th = (torch.tensor(x, requires_grad=True) for x in (q, t, h))
  qn, tn, hn = (F.normalize(x, dim=-1) for x in (tq, tt, th))
  sim = torch.cat([qn @ tn.T, qn @ hn.T], 1) / 0.05
  F.cross_entropy(sim, torch.arange(5)).backward()
  for a, b in ((gq, tq), (gt, tt), (gh, th)):
    np.testing.assert_allclose(a, b.grad.numpy(), rtol=RTOL, atol=1e-6)


def test_info_nce_bf16_inputs_give_fp32_loss():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
  t = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
  got = losses.info_nce_loss(q, t)
  assert got.dtype == jnp.float32
  ref = _torch_info_nce(np.asarray(q, np.float32), np.asarray(t, np.float32), 0.05)
  np.testing.assert_allclose(got, ref, rtol=RTOL)


@pytest.mark.parametrize("auto_axes", [False, True])
def test_sharded_info_nce_gradients_equal_single_device(auto_axes):
  """The global-batch loss on 4 devices equals the single-device loss on the concatenated
  batch -- loss and gradients (each device's rows see every device's targets)."""
  assert len(jax.devices()) >= 4
  rng = np.random.default_rng(5)
  b, d = 16, 12
  q = rng.standard_normal((b, d)).astype(np.float32)
  t = rng.standard_normal((b, d)).astype(np.float32)
  h = rng.standard_normal((b, 2, d)).astype(np.float32)

  def f(q, t, h):
    return losses.info_nce_loss(q, t, hard_negatives=h, symmetric=True)

  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  single = step(q, t, h)
  kw = {"axis_types": (jax.sharding.AxisType.Auto,)} if auto_axes else {}
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4], **kw)
  rows = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    sharded = step(*(jax.device_put(x, rows) for x in (q, t, h)))
  assert len(sharded[1][0].sharding.device_set) == 4
  np.testing.assert_allclose(sharded[0], single[0], rtol=RTOL)
  for a, b_ in zip(sharded[1], single[1]):
    np.testing.assert_allclose(a, b_, rtol=RTOL, atol=1e-7)
  # The per-device (local-batch) loss would differ: the global batch really is used.
  local = np.mean([float(f(q[i:i + 4], t[i:i + 4], h[i:i + 4])) for i in range(0, b, 4)])
  assert abs(local - float(single[0])) > 1e-3


def test_bad_inputs():
  z = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="neg_scores must be"):
    losses.pairwise_sigmoid_loss(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="reduction="):
    losses.pairwise_sigmoid_loss(np.zeros(3), np.zeros(3), reduction="avg")
  with pytest.raises(ValueError, match="query and target"):
    losses.info_nce_loss(z, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="hard_negatives must be"):
    losses.info_nce_loss(z, z, hard_negatives=np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="hard_negative_scope="):
    losses.info_nce_loss(z, z, hard_negative_scope="all")
  with pytest.raises(ValueError, match="temperature must be"):
    losses.info_nce_loss(z, z, temperature=0.0)
  with pytest.raises(ValueError, match="target_tokens"):
    losses.qure_scores(z, z)
