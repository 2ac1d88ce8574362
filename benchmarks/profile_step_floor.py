"""The QuRe train step's floor on this CPU: the least time the step can take with the matmul
kernels and the optimizer update this machine runs, against the speed goals. At the bench's
CPU sizes (benchmarks/bench_train_step.py: batch 4, CLIP-L width with 2 ViT layers, Q-Former
768 x 2 layers, fp32), with cached ViT features and with pixels.

    python benchmarks/profile_step_floor.py --out benchmarks/results/profile_step_floor_cpu.json

The step's matmuls are read from its jaxpr: every `dot_general` by shape and dimension numbers
(forward and backward, with their counts and FLOPs) and the convolutions' FLOPs (the pixel
step's patch embedding). Then `--rounds` rounds (after a warm-up round), each timing once,
back to back: the jax step and the torch step (the bench's two), every distinct matmul alone
in jax (`lax.dot_general`, jitted) and in torch (`einsum`, which calls mm/bmm), and the AdamW
update alone (jax: optax as the step runs it, jitted, state donated; torch: the step's
`optimizer.step()`). From each round:
  dot_floor_s    the faster side's time for each matmul, summed over the step's counts;
                 convolutions at the best rate any matmul reached. No implementation runs
                 these matmuls faster without faster kernels
  floor_s        dot_floor_s + the faster update. Left out, so the floor is low: softmax,
                 LayerNorm, GELU, dropout, the embedding lookup and its gradient, copies. The
                 sum assumes the matmuls and the update do not hide each other: on 2 cores each
                 keeps both busy (the matmuls with compute, the update with memory traffic)
  {jax,torch}_rest_s   the step less that side's matmuls and update timed alone: the rest
                 of its work (the parts the floor leaves out)
  best_of_both_s floor_s + the smaller rest: a step that ran every part at the faster side's
                 speed
  goal_s         torch step / goal (1.5 cached, 1.3 pixels): the jax step time the goal asks
                 for; `reachable` = floor_s <= goal_s, `reachable_best_of_both` likewise
  xla_floor_s    XLA's own matmuls and update, each timed alone: the work any jax program of
                 this step runs on XLA's CPU kernels (jax_rest_s says how far above it the
                 step runs); `xla_floor_over_goal` = xla_floor_s > goal_s: then no change to
                 cirjax's program meets the goal on this backend, only faster XLA kernels
The JSON holds each round's figures, their medians, and in how many rounds each bound
allowed the goal; also the 1-minute load average at start and end, cores and threads: a
profile taken on a loaded machine measures the load (docs/benchmarks.md).
"""

from __future__ import annotations

import collections
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position

GOALS = {"qure_step_cached": 1.5, "qure_step_pixels": 1.3}


def _sub_jaxprs(eqn):
  """(closed or open jaxpr, how many times it runs) for each jaxpr inside `eqn`."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(j, core.ClosedJaxpr):
        yield j.jaxpr, times
      elif isinstance(j, core.Jaxpr):
        yield j, times


def matmuls(jaxpr, times: int = 1, dots=None, convs=None):
  """(Counter of (lhs shape, rhs shape, dimension numbers) -> count, conv FLOPs) over every
  dot_general / conv in `jaxpr` and the jaxprs inside it; a `while` loop (trip count unknown)
  is an error, `cond` counts every branch (the floor only grows)."""
  dots = collections.Counter() if dots is None else dots
  convs = [0.0] if convs is None else convs
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "while":
      raise ValueError("a while loop in the step: its matmuls cannot be counted")
    if name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      key = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
             (tuple(lc), tuple(rc), tuple(lb), tuple(rb)))
      dots[key] += times
    elif name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape  # OIHW-like: every dim but the output features
      per_out = math.prod(rhs) / max(1, eqn.params["feature_group_count"]) / rhs[
          eqn.params["dimension_numbers"].rhs_spec[0]]
      convs[0] += times * 2.0 * math.prod(out) * per_out
    for sub, n in _sub_jaxprs(eqn):
      matmuls(sub, times * n, dots, convs)
  return dots, convs[0]


def dot_flops(key) -> float:
  lhs, rhs, (lc, rc, lb, rb) = key
  free_r = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
  return 2.0 * math.prod(lhs) * math.prod(free_r)


def _einsum_spec(key) -> str:
  lhs, rhs, (lc, rc, lb, rb) = key
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  l = [next(letters) for _ in lhs]
  r = [None] * len(rhs)
  for i, j in zip(lc, rc):
    r[j] = l[i]
  for i, j in zip(lb, rb):
    r[j] = l[i]
  r = [x or next(letters) for x in r]
  out = ([l[i] for i in lb] + [x for i, x in enumerate(l) if i not in lc and i not in lb]
         + [x for j, x in enumerate(r) if j not in rc and j not in rb])
  return f"{''.join(l)},{''.join(r)}->{''.join(out)}"


def dot_fns(key):
  """(jax callable, torch callable) running one matmul alone, each blocking until done."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  lhs, rhs, dn = key
  rng = np.random.default_rng(0)
  a = rng.standard_normal(lhs, dtype=np.float32)
  b = rng.standard_normal(rhs, dtype=np.float32)
  fn = jax.jit(lambda x, y: jax.lax.dot_general(x, y, ((dn[0], dn[1]), (dn[2], dn[3]))))
  ja, jb = jax.device_put(a), jax.device_put(b)
  spec = _einsum_spec(key)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)

  def torch_dot():
    with torch.no_grad():
      return torch.einsum(spec, ta, tb)
  return (lambda: fn(ja, jb).block_until_ready()), torch_dot


def update_fns(params, tstep):
  """The AdamW update alone, (jax, torch) callables: optax as the step runs it (jitted, state
  donated) on random gradients of the trained parameters, and the torch step's
  `optimizer.step()` on the gradients its last call left; and the trained parameter counts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step as step_bench  # pylint: disable=g-import-not-at-top
  from cirjax.train import state as st  # pylint: disable=g-import-not-at-top
  tx, mask = step_bench.jax_optimizer(params)
  state = st.init_state(params, tx)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(params))))
  grads = jax.tree.map(lambda m, p: jax.random.normal(next(keys), p.shape, p.dtype) if m
                       else jnp.zeros_like(p), mask, params)

  def apply(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

  update = jax.jit(apply, donate_argnums=(0,))
  holder = {"s": state}

  def jax_update():
    holder["s"] = update(holder["s"], grads)
    jax.block_until_ready(holder["s"])

  trained = sum(int(np.prod(p.shape)) for m, p in zip(jax.tree.leaves(mask),
                                                       jax.tree.leaves(params)) if m)
  opt = tstep.optimizer
  with_grad = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.grad is not None)
  return jax_update, opt.step, {"jax_trained_params": trained,
                                "torch_params_with_grad": int(with_grad)}


def _seconds(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _round(jstep, tstep, dots, jupd, tupd) -> dict:
  """One of each measurement, back to back: every part of a round sees the same machine
  (this VM's speed drifts by 20-30 % over minutes, which made separately taken medians
  disagree: the matmuls alone once took longer than the step)."""
  r = {"jax_step_s": _seconds(jstep), "torch_step_s": _seconds(tstep)}
  r["dots_jax_s"] = [_seconds(jf) for jf, _, _ in dots]
  r["dots_torch_s"] = [_seconds(tf) for _, tf, _ in dots]
  r["update_jax_s"], r["update_torch_s"] = _seconds(jupd), _seconds(tupd)
  return r


def _derive(r: dict, dots, conv_flops: float, goal: float) -> dict:
  """The floor and the best-of-both step of one round (module docstring)."""
  counts = [c for _, _, (c, _) in dots]
  flops = [f for _, _, (_, f) in dots]
  best = [min(j, t) for j, t in zip(r["dots_jax_s"], r["dots_torch_s"])]
  rate = max(f / t for f, t in zip(flops, best))
  conv_s = conv_flops / rate
  side = {k: sum(c * t for c, t in zip(counts, r[f"dots_{k}_s"])) + conv_s
          for k in ("jax", "torch")}
  dot_floor = sum(c * t for c, t in zip(counts, best)) + conv_s
  floor = dot_floor + min(r["update_jax_s"], r["update_torch_s"])
  rest = {k: r[f"{k}_step_s"] - side[k] - r[f"update_{k}_s"] for k in ("jax", "torch")}
  best_of_both = floor + max(0.0, min(rest.values()))
  goal_s = r["torch_step_s"] / goal
  return {"speedup_vs_torch": r["torch_step_s"] / r["jax_step_s"], "goal_s": goal_s,
          "dot_floor_s": dot_floor, "dots_jax_only_s": side["jax"],
          "dots_torch_only_s": side["torch"], "best_dot_rate_gflops": rate / 1e9,
          "floor_s": floor, "reachable": floor <= goal_s, "jax_rest_s": rest["jax"],
          "torch_rest_s": rest["torch"], "best_of_both_s": best_of_both,
          "reachable_best_of_both": best_of_both <= goal_s,
          "xla_floor_s": side["jax"] + r["update_jax_s"],
          "xla_floor_over_goal": side["jax"] + r["update_jax_s"] > goal_s}


def profile(rounds: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step as step_bench  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  jax.config.update("jax_default_matmul_precision", "highest")
  sz = step_bench._sizes("cpu", False)
  m = step_bench._hf_model(sz, "cpu")
  cfg, params = benchmarking.blip2_from_torch(m)
  run_cfg = cfg.replace(dtype="float32", vision_dtype=None, attention_impl="xla")
  b, text_len = sz["batch"], 32
  rng = np.random.default_rng(0)
  ids, mask = benchmarking.qure_text(rng, b, text_len)
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  out = {"sizes": sz, "rounds": rounds, "steps": {}}
  for cached in (True, False):
    name = "qure_step_cached" if cached else "qure_step_pixels"
    print(f"[profile_step_floor] {name}", file=sys.stderr, flush=True)
    batch, imgs_t = step_bench.step_inputs(rng, b, cached, ids, mask)
    step, state = step_bench._jax_step(run_cfg, jax.device_put(params), cached, "float32")
    batch = jax.device_put(batch)
    counted, conv_flops = matmuls(jax.make_jaxpr(step)(state, batch).jaxpr)
    keys = sorted(counted, key=lambda k: -dot_flops(k) * counted[k])
    dots = [(*dot_fns(k), (counted[k], dot_flops(k))) for k in keys]
    holder = {"s": state}

    def jstep():
      holder["s"], metrics = step(holder["s"], batch)
      jax.block_until_ready(metrics)

    torch_step = step_bench._torch_step(step_bench._hf_model(sz, "cpu"), cached, False)
    tstep = lambda: torch_step(*imgs_t, ids_t, mask_t)  # noqa: E731
    tstep()  # the gradients the torch update runs on
    jupd, tupd, counts = update_fns(jax.device_put(params), torch_step)
    _round(jstep, tstep, dots, jupd, tupd)  # warm-up: compiles, first touches
    per_round = [_round(jstep, tstep, dots, jupd, tupd) for _ in range(rounds)]
    derived = [_derive(r, dots, conv_flops, GOALS[name]) for r in per_round]
    med = {k: statistics.median(d[k] for d in derived) for k in derived[0]
           if not isinstance(derived[0][k], bool)}
    med.update({k: statistics.median(r[k] for r in per_round)
                for k in ("jax_step_s", "torch_step_s", "update_jax_s", "update_torch_s")})
    out["steps"][name] = {
        "goal": GOALS[name], **med,
        "reachable_rounds": sum(d["reachable"] for d in derived),
        "reachable_best_of_both_rounds": sum(d["reachable_best_of_both"] for d in derived),
        "xla_floor_over_goal_rounds": sum(d["xla_floor_over_goal"] for d in derived),
        "dot_gflop": sum(c * f for _, _, (c, f) in dots) / 1e9, "conv_gflop": conv_flops / 1e9,
        **counts, "distinct_dots": len(dots), "per_round": derived,
        "dots": [{"lhs": k[0], "rhs": k[1], "einsum": _einsum_spec(k), "count": counted[k],
                  "gflop": dot_flops(k) / 1e9,
                  "jax_s": statistics.median(r["dots_jax_s"][i] for r in per_round),
                  "torch_s": statistics.median(r["dots_torch_s"][i] for r in per_round)}
                 for i, k in enumerate(keys)]}
    s = out["steps"][name]
    print(f"[profile_step_floor] {name} (medians of {rounds} rounds): jax "
          f"{s['jax_step_s']:.3f} s, torch {s['torch_step_s']:.3f} s "
          f"({s['speedup_vs_torch']:.2f}x); goal {GOALS[name]}x = {s['goal_s']:.3f} s; floor "
          f"{s['floor_s']:.3f} s (matmuls {s['dot_floor_s']:.3f} + update); every part at the "
          f"faster side's speed {s['best_of_both_s']:.3f} s (rest: jax {s['jax_rest_s']:.3f}, "
          f"torch {s['torch_rest_s']:.3f}); rounds where the goal is within reach: floor "
          f"{s['reachable_rounds']}/{rounds}, best of both "
          f"{s['reachable_best_of_both_rounds']}/{rounds}; on XLA's kernels alone (its matmuls "
          f"{s['dots_jax_only_s']:.3f} s, torch's {s['dots_torch_only_s']:.3f}, + its update) "
          f"{s['xla_floor_s']:.3f} s, over the goal in {s['xla_floor_over_goal_rounds']}/"
          f"{rounds}", file=sys.stderr, flush=True)
  return out


def main(argv=None) -> int:
  return profiling.cli(argv, __doc__, profile, "--rounds", 7,
                       "rounds of measurements after a warm-up round")


if __name__ == "__main__":
  sys.exit(main())
