"""Where retrieval's time goes on CPU: each stage of `cirjax.eval.retrieval.top_k` timed
alone, JAX and PyTorch side by side, at the bench's CPU sizes (512 queries, 8,192 corpus
items, 256-d, k = 50; single-vector and 32-token max-over-tokens).

    python benchmarks/profile_retrieval.py --out benchmarks/results/profile_retrieval_cpu.json

Stages (median of `--iters` runs after one warm-up call):
  jax_full_as_bench       what `cirjax bench`'s eval rows time: a FeatureScorer per call
                          (features placed on the mesh, finite check) + `top_k`
  jax_scorer_build        the FeatureScorer alone
  jax_topk_prebuilt       `top_k` on a scorer built beforehand: CPU's default, the host path
                          (block scores into one row per query block, ranked by
                          `host_top_k` in NumPy)
  jax_topk_buffered       the same with one `lax.top_k` per query block (the multi-process
                          CPU program)
  jax_topk_streamed       the same with the accelerators' program (a running top_k merged
                          with every corpus block)
  jax_scores_einsum       the scores alone through `models.scoring.max_over_tokens` (einsum)
  jax_scores_flat_matmul  the same scores as one [Nq, D] x [D, N*T] matmul, then the max
  jax_matmul_only         that matmul without the max (the GEMM's share)
  jax_lax_top_k_only      `lax.top_k` of the whole [Nq, N] score matrix
  host_top_k_only         `host_top_k.top_k` of the same matrix (the host path's ranking)
  numpy_argpartition      NumPy's unsorted top-k of the same matrix (one call, one thread)
  torch_scores / torch_topk_only / torch_full_as_bench
                          the PyTorch reference's stages and whole (bench_eval._torch_topk)
Each row also gives GFLOP/s of the score stages (2 * Nq * N * T * D flops), and
`top_k_us_per_row`: XLA's CPU `lax.top_k`, torch's `topk` and `host_top_k` per score row
at k = 1 and 50 for row lengths from 512 to 32,768 (XLA's is one thread; torch's and
`host_top_k` split rows over the cores). `--at bench,cirr,fiq_shirt` also profiles CIRR's and FashionIQ's evaluation sizes
(benchmarks/bench_eval.py DATASET_SIZES). The JSON records
the 1-minute load average at start and end and the threads each framework used; a profile
taken on a loaded machine measures the load (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position



def profile(tokens: int, nq: int, n: int, dim: int, k: int, iters: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_eval  # pylint: disable=g-import-not-at-top
  from cirjax.eval import host_top_k, retrieval  # pylint: disable=g-import-not-at-top
  from cirjax.models.scoring import max_over_tokens  # pylint: disable=g-import-not-at-top

  q, c, exclude = bench_eval._features(nq, n, tokens, dim)  # pylint: disable=protected-access
  feats = c if tokens > 1 else c[:, 0]
  mesh = retrieval.make_mesh()
  t: dict[str, float] = {}
  t["jax_full_as_bench"] = profiling.median(lambda: retrieval.top_k(
      retrieval.FeatureScorer(q, feats, mesh=mesh), k, exclude, mesh), iters)
  t["jax_scorer_build"] = profiling.median(lambda: retrieval.FeatureScorer(q, feats, mesh=mesh), iters)
  scorer = retrieval.FeatureScorer(q, feats, mesh=mesh)
  t["jax_topk_prebuilt"] = profiling.median(lambda: retrieval.top_k(scorer, k, exclude, mesh), iters)
  for path in ("buffered", "streamed"):
    t[f"jax_topk_{path}"] = profiling.median(lambda path=path: retrieval.top_k(
        scorer, k, exclude, mesh, path=path), iters)
  qd, cd = jnp.asarray(q), jnp.asarray(c)
  einsum = jax.jit(max_over_tokens)
  matmul = jax.jit(lambda a, b: a @ b.reshape(-1, b.shape[-1]).T)
  flat = jax.jit(lambda a, b: (a @ b.reshape(-1, b.shape[-1]).T).reshape(
      a.shape[0], b.shape[0], b.shape[1]).max(-1))
  t["jax_scores_einsum"] = profiling.median(lambda: einsum(qd, cd).block_until_ready(), iters)
  t["jax_scores_flat_matmul"] = profiling.median(lambda: flat(qd, cd).block_until_ready(), iters)
  t["jax_matmul_only"] = profiling.median(lambda: matmul(qd, cd).block_until_ready(), iters)
  scores = einsum(qd, cd)
  top = jax.jit(lambda s: lax.top_k(s, k))
  t["jax_lax_top_k_only"] = profiling.median(lambda: jax.block_until_ready(top(scores)), iters)
  host = np.asarray(scores)
  t["host_top_k_only"] = profiling.median(lambda: host_top_k.top_k(host, k), iters)
  t["numpy_argpartition"] = profiling.median(lambda: np.argpartition(-host, k, axis=1)[:, :k], iters)
  tq, tc = torch.from_numpy(q), torch.from_numpy(c)

  def torch_scores():
    with torch.no_grad():
      return (tq @ tc.reshape(-1, dim).T).reshape(nq, n, tokens).amax(-1)

  t["torch_scores"] = profiling.median(torch_scores, iters)
  ts = torch_scores()
  t["torch_topk_only"] = profiling.median(lambda: torch.topk(ts, k, dim=1), iters)
  t["torch_full_as_bench"] = profiling.median(lambda: bench_eval._torch_topk(  # pylint: disable=protected-access
      q, feats if tokens > 1 else feats[:, None], exclude, k, torch.device("cpu")), iters)
  flops = 2.0 * nq * n * tokens * dim
  gflops = {f"{name}_gflops": flops / t[name] / 1e9
            for name in ("jax_scores_einsum", "jax_scores_flat_matmul", "jax_matmul_only",
                         "torch_scores")}
  return {"tokens": tokens, "queries": nq, "corpus": n, "dim": dim, "k": k,
          "seconds": t, **gflops,
          "full_speedup_vs_torch": t["torch_full_as_bench"] / t["jax_full_as_bench"]}


def top_k_per_row(iters: int, rows: int = 256) -> list[dict]:
  """Microseconds per score row of XLA's CPU `lax.top_k`, torch's `topk` and `host_top_k`."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from cirjax.eval import host_top_k  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out = []
  for n in (512, 2297, 8192, 32768):
    host = rng.standard_normal((rows, n)).astype(np.float32)
    dev, tt = jax.device_put(host), torch.from_numpy(host)
    for k in (1, 50):
      top = jax.jit(lambda s, k=k: lax.top_k(s, k))
      out.append({"n": n, "k": k,
                  "jax_us": 1e6 / rows * profiling.median(lambda: jax.block_until_ready(top(dev)), iters),
                  "torch_us": 1e6 / rows * profiling.median(lambda: torch.topk(tt, k, dim=1), iters),
                  "host_us": 1e6 / rows * profiling.median(lambda: host_top_k.top_k(host, k), iters)})
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")
  p.add_argument("--iters", type=int, default=5, help="timed runs per stage (default 5)")
  p.add_argument("--tokens", default="1,32", help="feature tokens per corpus item (default 1,32)")
  p.add_argument("--at", default="bench", help="sizes, comma-separated: bench (512 x 8,192), "
                 "cirr (4,181 x 2,297), fiq_shirt (2,038 x 6,346); default bench")
  args = p.parse_args(argv)
  out = {**profiling.start_record(), "rows": []}
  from benchmarks.bench_eval import DATASET_SIZES  # pylint: disable=g-import-not-at-top
  sizes = {"bench": (512, 8192), **{name: (nq, n) for name, nq, n in DATASET_SIZES}}
  for at in args.at.split(","):
    if at not in sizes:
      p.error(f"--at: unknown size {at!r} (choose from {', '.join(sizes)})")
    for tokens in (int(x) for x in args.tokens.split(",")):
      row = {"at": at, **profile(tokens, *sizes[at], 256, 50, args.iters)}
      print(json.dumps(row), flush=True)
      out["rows"].append(row)
  out["top_k_us_per_row"] = top_k_per_row(args.iters)
  profiling.finish(out, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
