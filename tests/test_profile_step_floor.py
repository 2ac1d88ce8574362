"""benchmarks/profile_step_floor.py counts a step's matmuls from its jaxpr: every dot (inside
jit, grad, scan and remat, times the scan's length) and convolution, with the FLOPs the
floor divides by, and times each one as the same contraction in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import profile_step_floor as floor


def _loss(w, x):
  def layer(h, wi):
    return jnp.tanh(h @ wi), None
  h, _ = jax.lax.scan(jax.checkpoint(layer), x, w)
  att = jnp.einsum("bqd,bkd->bqk", h[:, :3], h)
  return (att ** 2).sum()


def test_counts_the_dots_of_forward_and_backward_through_scan_and_remat():
  w = jnp.ones((3, 8, 8))
  x = jnp.ones((2, 5, 8))
  dots, conv = floor.matmuls(jax.make_jaxpr(jax.jit(jax.grad(_loss)))(w, x).jaxpr)
  assert conv == 0
  # The scan's layer matmul: 3 layers forward, 3 re-run by remat, 3 for the weight gradient
  # and 3 for the input gradient; the einsum: 1 forward + 2 gradients.
  layer_flops = 2 * 2 * 5 * 8 * 8
  by_flops = sorted(floor.dot_flops(k) * c for k, c in dots.items())
  assert sum(c for k, c in dots.items() if floor.dot_flops(k) == layer_flops) == 12
  att_flops = 2 * 2 * 3 * 5 * 8
  assert sum(c for k, c in dots.items() if floor.dot_flops(k) == att_flops) == 3
  assert sum(by_flops) == 12 * layer_flops + 3 * att_flops


def test_counts_convolution_flops():
  def f(x, k):
    return jax.lax.conv_general_dilated(x, k, (14, 14), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, k = jnp.ones((2, 28, 28, 3)), jnp.ones((14, 14, 3, 16))
  dots, conv = floor.matmuls(jax.make_jaxpr(f)(x, k).jaxpr)
  assert not dots
  assert conv == 2.0 * (2 * 2 * 2 * 16) * (14 * 14 * 3)


def test_a_while_loop_is_an_error_not_a_silent_undercount():
  def f(x):
    return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]
  with pytest.raises(ValueError, match="while loop"):
    floor.matmuls(jax.make_jaxpr(f)(jnp.ones((4, 4))).jaxpr)


@pytest.mark.parametrize("dn", [
    (((1,), (0,)), ((), ())),          # a @ b
    (((1,), (1,)), ((), ())),          # a @ b.T
    (((2,), (2,)), ((0,), (0,))),      # batched q k^T
    (((0,), (0,)), ((), ())),          # a.T @ b (a weight gradient)
])
def test_torch_einsum_computes_the_same_contraction(dn):
  shapes = {(((1,), (0,)), ((), ())): ((4, 6), (6, 5)),
            (((1,), (1,)), ((), ())): ((4, 6), (5, 6)),
            (((2,), (2,)), ((0,), (0,))): ((3, 4, 6), (3, 5, 6)),
            (((0,), (0,)), ((), ())): ((6, 4), (6, 5))}[dn]
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
  key = (shapes[0], shapes[1], (dn[0][0], dn[0][1], dn[1][0], dn[1][1]))
  want = np.asarray(jax.lax.dot_general(a, b, dn))
  got = torch.einsum(floor._einsum_spec(key), torch.from_numpy(a), torch.from_numpy(b))  # pylint: disable=protected-access
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
  assert floor.dot_flops(key) == 2.0 * a.size * b.size / np.prod([b.shape[i] for i in
                                                                   dn[0][1] + dn[1][1]])
