"""Hard-negative mining throughput: cirjax's two paths against the sort floor, PyTorch and
per-query loops.

Implementations of QuRe's reference algorithm (docs/reference_semantics.md#mining,
threshold 1) on the same score matrix, with identical results (checked in every run):

* `cirjax_numpy` -- `cirjax.mining.hard_negative_sets(method="numpy")`, the CPU default:
  one `np.sort` of packed 64-bit keys per row, a partition for the steepest drops,
  vectorised walk and gather, chunks of rows in threads.
* `cirjax_xla` -- `method="xla"`, the accelerator path: one jitted packed integer sort per
  row plus `top_k` over the drops, the ragged result gathered on device.
* `sort_floor` -- `np.sort` of every row's packed keys alone (one thread): what any
  sort-based mining costs at least on this CPU. cirjax rows carry `x_sort_floor`.
* `torch_per_block` -- a vectorised PyTorch version: one stable `torch.sort` per block of
  rows, `torch.topk` over the drops (ties made exact), a full stable sort of the drops only
  for rows whose walk needs it.
* `torch_per_query_loop` / `numpy_per_query_loop` -- one query at a time: a sort of the
  row, an argsort of the after-target drops, a walk. Timed on `loop_queries` queries: when
  that is fewer than all, the row's variant ends in `_extrapolated`, it says
  `extrapolated: true`, and its `step_time_s` is the full problem's time extrapolated from
  the measured rate (rows are independent).

Problems: `2k_x_17k` (2,000 x 17,000), `cirr` (28,225 training queries x 16,939 training
images), `fashioniq` (the dress category: 5,985 queries over the targets of its triplets,
image ids repeating), and on GPU `100k` (100,000 x 100,000, scores produced block by block
by a matmul on device: the whole matrix would be 40 GB). Scores are cosine similarities /
0.07 of random unit features with each target placed near the top, like a trained model's.
samples_per_s = queries mined per second; the score matrix starts on the device for every
implementation (it is produced there in training). cirjax rows carry `speedup_vs_<variant>`
(that row's time / the cirjax row's time). On GPU a `bandwidth_floor_s` row field gives the
time to read the score matrix once and write/read the sort keys once at the device's peak
memory bandwidth.

`python benchmarks/bench_mining.py [--device cpu|gpu] [--quick] [--only cirr ...]` writes
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
from cirjax.mining import accelerator, cpu  # noqa: E402  pylint: disable=g-import-not-at-top
from cirjax.mining import sets as mining_sets  # noqa: E402  pylint: disable=g-import-not-at-top

THRESHOLD = 1
TEMP = 0.07
# Peak memory bandwidth by device kind (datasheets), for the bandwidth floor; matched as a
# substring of `device_kind` in this order (PCIe / NVL variants before the SXM parts).
_GPU_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12, "H100": 3.35e12,
                  "A100": 2.0e12}


def _problems(device: str, quick: bool) -> list[dict]:
  """`loop_queries`: queries the per-query loops are timed on (all of them when >= q; the
  row then says it is measured in full, else that its full-size time is extrapolated)."""
  if quick:
    return _quick_problems(device)
  probs = [{"name": "2k_x_17k", "q": 2000, "n": 17000, "loop_queries": 2000, "iters": 2},
           {"name": "cirr", "q": 28225, "n": 16939, "loop_queries": 2000, "iters": 1},
           {"name": "fashioniq", "q": 5985, "n": 5985, "repeat_ids": True,
            "loop_queries": 5985, "iters": 1}]
  if device == "gpu":
    for p in probs:
      p.update(iters=5, loop_queries=200)
    probs.append({"name": "100k", "q": 100_000, "n": 100_000, "matmul_blocks": True,
                  "loop_queries": 50, "iters": 2})
  return probs


def _quick_problems(device: str) -> list[dict]:
  probs = [{"name": "cirr_small", "q": 512, "n": 2048, "loop_queries": 512, "iters": 2},
           {"name": "fashioniq_small", "q": 384, "n": 1024, "repeat_ids": True,
            "loop_queries": 384, "iters": 2}]
  if device == "gpu":  # the 100k problem's path: scores made block by block on device
    probs.append({"name": "matmul_small", "q": 512, "n": 1024, "matmul_blocks": True,
                  "loop_queries": 64, "iters": 2})
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


def _bandwidth_floor(q: int, n: int, device: str, dry_run=None) -> tuple[float | None, str]:
  """Seconds to read the fp32 scores once and write + read 8-byte sort keys once."""
  if device != "gpu" or dry_run is not None:
    return None, "cpu: no fixed bandwidth figure"
  kind = getattr(jax.devices()[0], "device_kind", "")
  for key, bw in _GPU_BANDWIDTH.items():
    if key in kind:
      return q * n * (4 + 8 + 8) / bw, f"{key} datasheet {bw / 1e12:.2f} TB/s"
  return None, f"unknown GPU {kind!r}"


def _timed(fn, warm_fn, iters: int, dry_run=None, program: str = "", impl: str = "jax"):
  """(timing dict like `benchmarking.time_fn`, last output). `warm_fn` compiles on a small
  slice, so big problems are not run an extra time just to warm up. A dry run: one call."""
  if dry_run is not None:
    return dry_run.run_once(program, fn, impl)
  benchmarking.block(warm_fn())
  samples, out = [], None
  for _ in range(iters):
    t0 = time.perf_counter()
    out = benchmarking.block(fn())
    samples.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(samples), "min_s": min(samples),
          "mean_s": statistics.fmean(samples), "iters": iters, "warmup": "first block"}, out


def numpy_per_query_loop(scores, targets, threshold: int = THRESHOLD, num: int | None = None):
  """The plainest NumPy version, one query at a time: a stable argsort of the row, a stable
  argsort of the after-target drops, a vectorised walk. Returns corpus-position arrays."""
  out = []
  for i in range(num if num is not None else scores.shape[0]):
    row = np.asarray(scores[i], np.float32)
    order = np.argsort(-row, kind="stable")
    p = int(np.nonzero(order == targets[i])[0][0])
    after_v, after_i = row[order[p + 1:]], order[p + 1:]
    if len(after_v) < 3:
      out.append(after_i[:0])
      continue
    ranking = np.argsort(after_v[1:] - after_v[:-1], kind="stable")
    ok = np.abs(ranking[1:] - ranking[:-1]) > threshold
    if not ok.any():
      out.append(after_i[:0])
      continue
    r = int(np.argmax(ok))
    i1, i2 = sorted((int(ranking[r]), int(ranking[r + 1])))
    out.append(after_i[i1 + 1:i2 + 1])
  return out


def sort_floor_s(host: np.ndarray, rows: int = 1024) -> float:
  """Seconds NumPy takes to sort every row's packed 64-bit keys (score bits | position),
  one thread, blocks of `rows` (building the keys is not timed): the floor of any
  sort-based mining on this CPU."""
  n = host.shape[1]
  cols = np.arange(n, dtype=np.uint32)
  total = 0.0
  for a in range(0, host.shape[0], rows):
    # pylint: disable-next=protected-access
    keys = cpu._np_pack(cpu._np_desc_bits(host[a:a + rows]), cols)
    t0 = time.perf_counter()
    keys.sort(axis=1)
    total += time.perf_counter() - t0
  return total


def _loop_row(p, name, impl, variant, fn, scores, targets, ref_sets, shapes, tdev, dry_run=None):
  """A per-query loop timed on `loop_queries` queries; its full-size time is measured when
  that is every query, else extrapolated (rows are independent) and labelled so. A dry run
  runs the loop on 8 queries."""
  q = p["q"]
  nl = min(p["loop_queries"], q, 8 if dry_run is not None else q)
  print(f"[{p['name']}] timing {impl} {variant} on {nl} queries", file=sys.stderr, flush=True)

  def loop():
    out = fn(scores, targets, num=nl)
    if tdev == "cuda":
      import torch  # pylint: disable=g-import-not-at-top
      torch.cuda.synchronize()
    return out
  t0 = time.perf_counter()
  out = loop() if dry_run is None else dry_run.run_once(name, loop, variant)[1]
  dt = time.perf_counter() - t0
  as_np = lambda x: x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)  # noqa: E731
  same = all(np.array_equal(as_np(out[i]), ref_sets[i]) for i in range(nl))
  full = nl >= q
  return {"name": name, "impl": impl, "variant": variant if full else f"{variant}_extrapolated",
          "step_time_s": dt * q / nl,
          "samples_per_s": nl / dt, "batch": q, "queries_measured": nl, "shapes": shapes,
          "extrapolated": not full,
          "note": (f"measured on all {q} queries" if full else
                   f"EXTRAPOLATED: timed on the first {nl} of {q} queries, "
                   f"step_time_s = {q} / measured rate (rows are independent)"),
          "identical_to_jax": same}


def _dry_compile_kernel(name: str, rows: int, n: int, dry_run) -> None:
  """A dry run's build / compile / CUDA lowering of the jitted XLA mining kernel at the block
  shape `hard_negative_sets(method="xla")` runs (default options, no mesh)."""
  args = (jax.ShapeDtypeStruct((rows, n), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32),
          np.int32(min(THRESHOLD, n)), np.bool_(False))
  with jax.enable_x64(True):  # the kernel sorts packed 64-bit keys, as the driver runs it
    # pylint: disable-next=protected-access  # the kernel the driver calls once per block
    kernel = accelerator._compiled("qure", (("top_drops", 32),), None, None)
    benchmarking.compile_program(name, kernel, *args, dry_run=dry_run)


def _problem_rows(p: dict, device: str, dry_run=None) -> list[dict]:
  """Long because: one problem's seven rows, each timed and checked against the others."""
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
  # The default budget (1 GiB) gives the block; warm-up compiles on one full block.
  block = min(q, mining.block_rows_for_budget(n, mining.DEFAULT_MEMORY_BUDGET))
  shapes["block_rows"] = block
  threads = len(os.sched_getaffinity(0))

  def run_jax(method, nq=q, image_ids=ids):
    return mining.hard_negative_sets(jax_block, targets[:nq], num_queries=nq, corpus_size=n,
                                     image_ids=image_ids, consecutive_threshold=THRESHOLD,
                                     block_size=block, method=method)
  name = f"mine_{p['name']}"
  if dry_run is not None:
    _dry_compile_kernel(name, block, n, dry_run)
  timed = {}
  for method in (("xla",) if device == "gpu" else ("numpy", "xla")):
    print(f"[{p['name']}] timing cirjax {method}", file=sys.stderr, flush=True)
    timed[method] = _timed(lambda m=method: run_jax(m), lambda m=method: run_jax(m, block),
                           p["iters"], dry_run, name)
  rows = []
  for method, (t, (sets, stats)) in timed.items():
    floor, floor_src = _bandwidth_floor(q, n, device, dry_run)
    rows.append({"name": name, "impl": "jax", "variant": f"cirjax_{method}",
                 "step_time_s": t["median_s"], "samples_per_s": q / t["median_s"],
                 "batch": q, "shapes": shapes, "timing": t,
                 "mean_set_size": float(stats.set_size.mean()),
                 "empty_sets": int((stats.set_size == 0).sum()),
                 "bandwidth_floor_s": floor, "bandwidth_floor_source": floor_src,
                 **({"threads": threads} if method == "numpy" else {})})
  if "numpy" in timed:
    (_, (a, _)), (_, (b, _)) = timed["numpy"], timed["xla"]
    rows[0]["identical_to_xla"] = bool(np.array_equal(a.offsets, b.offsets)
                                       and np.array_equal(a.indices, b.indices))
  if host is not None:
    print(f"[{p['name']}] timing the sort floor", file=sys.stderr, flush=True)
    fl = min(sort_floor_s(host) for _ in range(1 if dry_run else max(1, p["iters"])))
    # impl "floor": not a reference implementation, so `cirjax bench` ratios skip it.
    rows.append({"name": name, "impl": "floor", "variant": "sort_floor", "step_time_s": fl,
                 "samples_per_s": q / fl, "batch": q, "shapes": shapes,
                 "note": "np.sort of every row's packed 64-bit keys alone, one thread"})
  # Position sets (before de-duplication by image id) are what the baselines compute.
  ref_sets = (timed[next(iter(timed))][1][0] if ids is None
              else run_jax(next(iter(timed)), image_ids=None)[0])
  tdev = benchmarking.torch_device(device, dry_run)
  rows += _torch_rows(p, name, host, qf, cf, targets, ids, ref_sets, shapes, tdev, dry_run)
  if host is not None:
    rows.append(_loop_row(p, name, "numpy", "numpy_per_query_loop", numpy_per_query_loop,
                          host, targets, ref_sets, shapes, tdev, dry_run))
  _add_ratios(rows)
  return rows


def _add_ratios(rows: list[dict]) -> None:
  """Ratios on each cirjax row: time of every other row / its own time."""
  by = {r["variant"]: r["step_time_s"] for r in rows}
  for r in rows:
    if r["impl"] != "jax":
      continue
    for other, t in by.items():
      if other != r["variant"]:
        key = "x_sort_floor" if other == "sort_floor" else f"speedup_vs_{other}"
        r[key] = (r["step_time_s"] / t) if other == "sort_floor" else t / r["step_time_s"]


def _torch_rows(p, name, host, qf, cf, targets, ids, ref_sets, shapes, tdev, dry_run=None):
  try:
    # torch is optional here: without it only the cirjax rows are measured.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  q, n = p["q"], p["n"]
  tdev = torch.device(tdev)
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
  print(f"[{p['name']}] timing torch per block", file=sys.stderr, flush=True)

  def run_block(nq=q):
    return torch_per_block(torch_block_fn, targets, nq, n, device=tdev)
  t_blk, (off, flat) = _timed(run_block, lambda: run_block(min(q, 1024)), p["iters"], dry_run,
                              name, "torch_per_block")
  if ids is not None:  # the same unique-ids-minus-target post-processing, timed apart
    t0 = time.perf_counter()
    mining_sets.dedup_minus_target(off, ids[flat], ids[targets])
    dedup_s = time.perf_counter() - t0
    for key in ("median_s", "min_s", "mean_s"):
      t_blk[key] += dedup_s
  same_block = bool(np.array_equal(off, ref_sets.offsets)
                    and np.array_equal(flat, ref_sets.indices))
  rows = [{"name": name, "impl": "torch", "variant": "torch_per_block",
           "step_time_s": t_blk["median_s"], "samples_per_s": q / t_blk["median_s"],
           "batch": q, "shapes": shapes, "timing": t_blk,
           "identical_to_jax": same_block, "torch_threads": torch.get_num_threads()}]
  loop_scores = torch_block_fn(0, min(p["loop_queries"], q))
  row = _loop_row(p, name, "torch", "torch_per_query_loop", torch_per_query_loop,
                  loop_scores, targets, ref_sets, shapes, tdev.type, dry_run)
  row["torch_threads"] = torch.get_num_threads()
  return rows + [row]


def run(device: str = "cpu", quick: bool = False, only: list[str] | None = None,
        dry_run=None) -> list[dict]:
  """Benchmark rows (see the module docstring); `only` restricts to named problems;
  `dry_run`: a `benchmarking.DryRun`: the `device` path run once on the CPU."""
  rows = []
  for p in _problems(device, quick):
    if only and p["name"] not in only:
      continue
    rows += _problem_rows(p, device, dry_run)
  return rows


def _loop_ratio(row: dict, impl: str) -> float:
  key = f"speedup_vs_{impl}_per_query_loop"
  return row.get(key, row.get(f"{key}_extrapolated", float("nan")))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default cpu")
  ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
  ap.add_argument("--only", nargs="*", help="problem names (cirr, fashioniq, 100k, ...)")
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  ap.add_argument("--dry-run", action="store_true",
                  help="the --device gpu path once through on this CPU at quick sizes (as "
                  "`cirjax bench --dry-run`); writes <out>/dryrun/")
  args = ap.parse_args(argv)
  if args.dry_run:
    from cirjax.commands import bench  # pylint: disable=g-import-not-at-top
    return bench.script_dry_run(__file__, args.device, args.out)
  args.device = args.device or "cpu"
  if args.device == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    jax.config.update("jax_platforms", "cpu")
  rows = run(args.device, args.quick, args.only)
  name = f"mining_{args.device}" + ("_quick" if args.quick else "")
  path = benchmarking.write_results(name, rows, args.out, extra={"quick": args.quick})
  print(benchmarking.format_table(rows, ["name", "impl", "variant", "batch", "step_time_s",
                                         "samples_per_s", "extrapolated", "identical_to_jax"]))
  for r in rows:
    if r["variant"] == "cirjax_numpy":
      print(f"{r['name']}: cirjax numpy {r.get('x_sort_floor', float('nan')):.2f}x the sort "
            f"floor, {r.get('speedup_vs_cirjax_xla', float('nan')):.2f}x the XLA path, "
            f"{r.get('speedup_vs_torch_per_block', float('nan')):.2f}x torch per-block, "
            f"{_loop_ratio(r, 'numpy'):.1f}x the NumPy per-query loop, "
            f"{_loop_ratio(r, 'torch'):.1f}x the torch per-query loop")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
