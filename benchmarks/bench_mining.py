"""Hard-negative mining throughput: cirjax's jitted top-2 gap search vs PyTorch.

Three implementations of QuRe's reference algorithm (docs/reference_semantics.md#mining,
threshold 1) on the same score matrix, with identical results (checked in every run):

* `jax` -- `cirjax.mining.hard_negative_sets`: one packed integer sort per row plus `top_k`
  over the drops, query blocks sized to a memory budget, ragged result gathered on device.
* `torch`, `variant="per_block"` -- a vectorised PyTorch version: one stable `torch.sort`
  per block of rows, `torch.topk` over the drops (ties made exact), a full stable sort of
  the drops only for rows whose walk needs it.
* `torch`, `variant="per_query_loop"` -- the reference code's style: a Python loop over
  queries, `torch.sort` of the row, `argsort` of the after-target drops, a Python walk.
  Slow by construction, so it is timed on the first `loop_queries` queries (rows are
  independent: queries/s extrapolates).

Problems: `cirr` (28,225 training queries x 16,939 training images), `fashioniq` (the dress
category: 5,985 queries over the targets of its triplets, image ids repeating), and on GPU
`100k` (100,000 x 100,000, scores produced block by block by a matmul on device: the whole
matrix would be 40 GB). Scores are cosine similarities / 0.07 of random unit features with
each target placed near the top, like a trained model's. samples_per_s = queries mined per
second; the score matrix starts on the device for every implementation (it is produced
there in training). On GPU a `bandwidth_floor_s` row field gives the time to read the score
matrix once and write/read the sort keys once at the device's peak memory bandwidth.

`python benchmarks/bench_mining.py [--device cpu|gpu] [--quick]` writes
benchmarks/results/mining_<device>.json (`--quick`: small shapes, seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from a checkout: make the repository's cirjax importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cirjax import benchmarking, mining  # noqa: E402  pylint: disable=g-import-not-at-top

THRESHOLD = 1
TEMP = 0.07
# Peak memory bandwidth by device kind (datasheets), for the bandwidth floor.
_GPU_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _problems(device: str, quick: bool) -> list[dict]:
  if quick:
    return [{"name": "cirr_small", "q": 512, "n": 2048, "loop_queries": 128, "iters": 2,
             "interleave_rows": 256},
            {"name": "fashioniq_small", "q": 384, "n": 1024, "repeat_ids": True,
             "loop_queries": 128, "iters": 2}]
  probs = [{"name": "cirr", "q": 28225, "n": 16939, "loop_queries": 400, "iters": 1,
            "interleave_rows": 2640},
           {"name": "fashioniq", "q": 5985, "n": 5985, "repeat_ids": True,
            "loop_queries": 400, "iters": 1}]
  if device == "gpu":
    for p in probs:
      p.update(iters=5, loop_queries=200)
    probs.append({"name": "100k", "q": 100_000, "n": 100_000, "matmul_blocks": True,
                  "loop_queries": 50, "iters": 2})
  return probs


def _features(q: int, n: int, dim: int = 256, seed: int = 0):
  """Unit query/corpus features; each query's target is a noisy copy of the query."""
  rng = np.random.default_rng(seed)
  qf = rng.standard_normal((q, dim), dtype=np.float32)
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  cf = rng.standard_normal((n, dim), dtype=np.float32)
  cf /= np.linalg.norm(cf, axis=1, keepdims=True)
  targets = rng.integers(0, n, q).astype(np.int32)
  return qf, cf, targets


def _host_scores(qf, cf, targets, seed: int = 1) -> np.ndarray:
  """[Q, N] scores / TEMP with each target moved near the top of its row."""
  rng = np.random.default_rng(seed)
  s = qf @ cf.T
  rows = np.arange(len(targets))
  # A trained model ranks the target high: rowmax minus a small positive gap.
  s[rows, targets] = s.max(axis=1) - np.abs(rng.standard_normal(len(targets))) * 0.05
  s /= np.float32(TEMP)
  return s


# ---------------------------------------------------------------------------------------
# PyTorch implementations of the same algorithm.

def torch_per_query_loop(scores, targets, threshold: int = THRESHOLD, num: int | None = None):
  """The reference code's style: one query at a time, Python walk. Returns a list of
  corpus-position tensors (descending score order)."""
  # torch is optional here: without it only the cirjax rows are measured.
  import torch  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(num if num is not None else scores.shape[0]):
    vals, idx = torch.sort(scores[i], descending=True, stable=True)
    p = int((idx == int(targets[i])).nonzero()[0])
    after_v, after_i = vals[p + 1:], idx[p + 1:]
    if len(after_v) < 3:
      out.append(after_i[:0])
      continue
    d = after_v[1:] - after_v[:-1]
    ranking = torch.argsort(d, stable=True).tolist()
    chosen = None
    for r in range(len(ranking) - 1):
      i1, i2 = sorted((ranking[r], ranking[r + 1]))
      if i2 - i1 > threshold:
        chosen = (i1, i2)
        break
    out.append(after_i[chosen[0] + 1:chosen[1] + 1] if chosen else after_i[:0])
  return out


def _torch_walk(ranked, nvalid, threshold):
  # torch is optional here: without it only the cirjax rows are measured.
  import torch  # pylint: disable=g-import-not-at-top
  a, b = ranked[:, :-1], ranked[:, 1:]
  r = torch.arange(1, ranked.shape[1], device=ranked.device)
  ok = ((a - b).abs() > threshold) & (r[None, :] < nvalid[:, None])
  found = ok.any(1)
  first = ok.to(torch.int8).argmax(1, keepdim=True)
  ka, kb = a.gather(1, first)[:, 0], b.gather(1, first)[:, 0]
  return found, torch.minimum(ka, kb), torch.maximum(ka, kb)


def torch_per_block(score_block_fn, targets, q: int, n: int, threshold: int = THRESHOLD,
                    block: int = 1024, top_drops: int = 32, device=None):
  """Vectorised over rows: returns (offsets, flat corpus positions) on the host."""
  # torch is optional here: without it only the cirjax rows are measured.
  import torch  # pylint: disable=g-import-not-at-top
  tt = torch.as_tensor(targets.astype(np.int64), device=device)
  pieces, sizes = [], []
  for a in range(0, q, block):
    s = score_block_fn(a, min(a + block, q))
    t = tt[a:a + s.shape[0]]
    vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
    start = (idx == t[:, None]).to(torch.int8).argmax(1) + 1
    drops = vals[:, 1:] - vals[:, :-1]
    kpos = torch.arange(n - 1, device=s.device)
    valid = kpos[None, :] >= start[:, None]
    nvalid = (n - start - 1).clamp(min=0)
    d = torch.where(valid, drops, torch.full_like(drops, float("inf")))
    r = min(top_drops + 1, n - 1)
    cand_v, cand_i = torch.topk(d, r, dim=1, largest=False)
    # topk's order among equal drops is unspecified: order candidates by (value, position)
    # and trust only ranks strictly steeper than the last candidate (its tie group may be
    # incomplete); rows whose walk does not finish there get a full stable sort.
    cand_i, perm = cand_i.sort(dim=1)
    cand_v = cand_v.gather(1, perm)
    cand_v, perm = cand_v.sort(dim=1, stable=True)
    cand_i = cand_i.gather(1, perm)
    certain = (cand_v < cand_v[:, -1:]).sum(1)
    found, k1, k2 = _torch_walk(cand_i, torch.minimum(nvalid, certain), threshold)
    need = ~found & (nvalid >= 2)
    if need.any():
      rows = need.nonzero()[:, 0]
      ranked = torch.argsort(d[rows], dim=1, stable=True)
      f2, a2, b2 = _torch_walk(ranked, nvalid[rows], threshold)
      found[rows], k1[rows], k2[rows] = f2, a2, b2
    found &= (n - start) >= 3
    size = torch.where(found, k2 - k1, torch.zeros_like(k1))
    lo = k1 + 1
    # Ragged compaction on device, as cirjax does.
    total = int(size.sum())
    if total:
      row = torch.repeat_interleave(torch.arange(len(size), device=s.device), size)
      first = torch.cumsum(size, 0) - size
      col = lo[row] + torch.arange(total, device=s.device) - first[row]
      pieces.append(idx[row, col].cpu().numpy())
    sizes.append(size.cpu().numpy())
  sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  return offsets, flat


# ---------------------------------------------------------------------------------------


def _bandwidth_floor(q: int, n: int, device: str) -> tuple[float | None, str]:
  """Seconds to read the fp32 scores once and write + read 8-byte sort keys once."""
  if device != "gpu":
    return None, "cpu: no fixed bandwidth figure"
  kind = getattr(jax.devices()[0], "device_kind", "")
  for key, bw in _GPU_BANDWIDTH.items():
    if key in kind:
      return q * n * (4 + 8 + 8) / bw, f"{key} datasheet {bw / 1e12:.2f} TB/s"
  return None, f"unknown GPU {kind!r}"


def _timed(fn, warm_fn, iters: int):
  """(timing dict like `benchmarking.time_fn`, last output). `warm_fn` compiles on a small
  slice, so big problems are not run an extra time just to warm up."""
  benchmarking.block(warm_fn())
  samples, out = [], None
  for _ in range(iters):
    t0 = time.perf_counter()
    out = benchmarking.block(fn())
    samples.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(samples), "min_s": min(samples),
          "mean_s": statistics.fmean(samples), "iters": iters, "warmup": "first block"}, out


def _problem_rows(p: dict, device: str) -> list[dict]:
  q, n = p["q"], p["n"]
  qf, cf, targets = _features(q, n)
  ids = None
  if p.get("repeat_ids"):
    # FashionIQ's corpus = targets of the triplets: ~2/3 as many distinct images as entries.
    ids = np.random.default_rng(2).integers(0, (2 * n) // 3, n).astype(np.int32)
  shapes = {"queries": q, "corpus": n, "threshold": THRESHOLD, "image_ids": ids is not None,
            "devices": jax.device_count()}
  print(f"[{p['name']}] {q} x {n}: preparing scores", file=sys.stderr, flush=True)
  if p.get("matmul_blocks"):
    qd, cd = jnp.asarray(qf), jnp.asarray(cf)
    tgt = jnp.asarray(targets)

    @jax.jit
    def block_scores(qb, tb):
      s = qb @ cd.T
      s = s.at[jnp.arange(qb.shape[0]), tb].set(jnp.max(s, axis=1) - 0.01)
      return s / TEMP

    def jax_block(a, b):
      return block_scores(qd[a:b], tgt[a:b])
    source = "matmul per block on device"
    host = None
  else:
    host = _host_scores(qf, cf, targets)
    dev = jax.device_put(host)
    jax_block = lambda a, b: dev[a:b]  # noqa: E731
    source = "device-resident [Q, N] matrix"
  shapes["score_source"] = source

  def run_jax(nq=q):
    return mining.hard_negative_sets(jax_block, targets[:nq], num_queries=nq, corpus_size=n,
                                     image_ids=ids, consecutive_threshold=THRESHOLD,
                                     block_size=block)
  # The default budget (1 GiB) gives the block; warm-up compiles on one full block.
  block = min(q, mining.block_rows_for_budget(n, mining.DEFAULT_MEMORY_BUDGET))
  shapes["block_rows"] = block
  floor, floor_src = _bandwidth_floor(q, n, device)
  print(f"[{p['name']}] timing jax", file=sys.stderr, flush=True)
  t_jax, (sets, stats) = _timed(run_jax, lambda: run_jax(block), p["iters"])
  rows = [{"name": f"mine_{p['name']}", "impl": "jax", "variant": "cirjax",
           "step_time_s": t_jax["median_s"], "samples_per_s": q / t_jax["median_s"],
           "batch": q, "shapes": shapes, "timing": t_jax,
           "mean_set_size": float(stats.set_size.mean()),
           "empty_sets": int((stats.set_size == 0).sum()),
           "bandwidth_floor_s": floor, "bandwidth_floor_source": floor_src}]
  try:
    # torch is optional here: without it only the cirjax rows are measured.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return rows
  tdev = torch.device("cuda" if device == "gpu" else "cpu")
  if host is None:
    qt, ct = torch.from_numpy(qf).to(tdev), torch.from_numpy(cf).to(tdev)
    tt = torch.from_numpy(targets.astype(np.int64)).to(tdev)

    def torch_block_fn(a, b):
      s = qt[a:b] @ ct.T
      s[torch.arange(b - a, device=tdev), tt[a:b]] = s.max(1).values - 0.01
      return s / TEMP
  else:
    st_all = torch.from_numpy(host).to(tdev)
    torch_block_fn = lambda a, b: st_all[a:b]  # noqa: E731

  # Position sets (before de-duplication by image id) are what the algorithms compute;
  # compare those: cirjax's `span`-sized sets are recovered by mining without ids.
  if ids is not None:
    ref_sets, _ = mining.hard_negative_sets(jax_block, targets, num_queries=q, corpus_size=n,
                                            consecutive_threshold=THRESHOLD)
  else:
    ref_sets = sets

  print(f"[{p['name']}] timing torch per block", file=sys.stderr, flush=True)

  def run_block(nq=q):
    return torch_per_block(torch_block_fn, targets, nq, n, device=tdev)
  t_blk, (off, flat) = _timed(run_block, lambda: run_block(min(q, 1024)), p["iters"])
  if ids is not None:  # the same unique-ids-minus-target post-processing, timed apart
    t0 = time.perf_counter()
    mining._dedup_minus_target(off, ids[flat], ids[targets])  # pylint: disable=protected-access
    dedup_s = time.perf_counter() - t0
    for key in ("median_s", "min_s", "mean_s"):
      t_blk[key] += dedup_s
  same_block = bool(np.array_equal(off, ref_sets.offsets)
                    and np.array_equal(flat, ref_sets.indices))
  rows.append({"name": f"mine_{p['name']}", "impl": "torch", "variant": "per_block",
               "step_time_s": t_blk["median_s"], "samples_per_s": q / t_blk["median_s"],
               "batch": q, "shapes": shapes, "timing": t_blk,
               "identical_to_jax": same_block, "torch_threads": torch.get_num_threads()})

  nl = min(p["loop_queries"], q)
  print(f"[{p['name']}] timing torch per-query loop on {nl} queries", file=sys.stderr,
        flush=True)
  loop_scores = torch_block_fn(0, nl)
  t0 = time.perf_counter()
  loop = torch_per_query_loop(loop_scores, targets, num=nl)
  if device == "gpu":
    torch.cuda.synchronize()
  dt = time.perf_counter() - t0
  same_loop = all(np.array_equal(loop[i].cpu().numpy(), ref_sets[i]) for i in range(nl))
  rows.append({"name": f"mine_{p['name']}", "impl": "torch", "variant": "per_query_loop",
               "step_time_s": dt, "samples_per_s": nl / dt, "batch": nl,
               "queries_measured": nl, "shapes": shapes,
               "note": f"timed on the first {nl} of {q} queries (rows are independent)",
               "identical_to_jax": same_loop, "torch_threads": torch.get_num_threads()})
  if p.get("interleave_rows"):
    rows += _interleaved_rows(p, run_jax, run_block, torch_block_fn, targets, shapes, device)
  rows[0]["speedup_vs_torch_per_block"] = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
  rows[0]["speedup_vs_torch_per_query_loop"] = (rows[0]["samples_per_s"]
                                                / rows[2]["samples_per_s"])
  if floor:
    rows[0]["fraction_of_bandwidth_floor"] = floor / t_jax["median_s"]
  return rows


def _interleaved_rows(p, run_jax, run_block, torch_block_fn, targets, shapes, device):
  """Rates on the first `interleave_rows` queries, the three implementations alternating for
  `rounds` rounds (medians): on a shared machine the load drifts between the long
  sequential runs above, and alternating exposes all three to the same drift."""
  nq, nl, rounds = p["interleave_rows"], min(p["loop_queries"], p["interleave_rows"]), 3
  loop_scores = torch_block_fn(0, nl)
  rates = {"cirjax": [], "per_block": [], "per_query_loop": []}
  for _ in range(rounds):
    for name, fn, count in (("cirjax", lambda: run_jax(nq), nq),
                            ("per_block", lambda: run_block(nq), nq),
                            ("per_query_loop",
                             lambda: torch_per_query_loop(loop_scores, targets, num=nl), nl)):
      t0 = time.perf_counter()
      benchmarking.block(fn())
      rates[name].append(count / (time.perf_counter() - t0))
  out = []
  for name, r in rates.items():
    med = statistics.median(r)
    out.append({"name": f"mine_{p['name']}_interleaved", "impl": "jax" if name == "cirjax"
                else "torch", "variant": name, "samples_per_s": med,
                "step_time_s": (nl if name == "per_query_loop" else nq) / med,
                "batch": nl if name == "per_query_loop" else nq, "rates": r,
                "shapes": dict(shapes, queries_measured=nl if name == "per_query_loop" else nq)})
  out[0]["speedup_vs_torch_per_block"] = out[0]["samples_per_s"] / out[1]["samples_per_s"]
  out[0]["speedup_vs_torch_per_query_loop"] = out[0]["samples_per_s"] / out[2]["samples_per_s"]
  return out


def run(device: str = "cpu", quick: bool = False, only: list[str] | None = None) -> list[dict]:
  """Benchmark rows (see the module docstring); `only` restricts to named problems."""
  rows = []
  for p in _problems(device, quick):
    if only and p["name"] not in only:
      continue
    rows += _problem_rows(p, device)
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
  ap.add_argument("--only", nargs="*", help="problem names (cirr, fashioniq, 100k, ...)")
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  args = ap.parse_args(argv)
  if args.device == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    jax.config.update("jax_platforms", "cpu")
  rows = run(args.device, args.quick, args.only)
  name = f"mining_{args.device}" + ("_quick" if args.quick else "")
  path = benchmarking.write_results(name, rows, args.out, extra={"quick": args.quick})
  print(benchmarking.format_table(rows, ["name", "impl", "variant", "batch", "step_time_s",
                                         "samples_per_s", "identical_to_jax"]))
  for r in rows:
    if r["impl"] == "jax" and "speedup_vs_torch_per_block" in r:
      print(f"{r['name']}: cirjax {r['speedup_vs_torch_per_block']:.2f}x torch per-block, "
            f"{r['speedup_vs_torch_per_query_loop']:.1f}x torch per-query loop")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
