"""Evaluation throughput: blocked on-device retrieval (matmul + top_k) vs PyTorch, and the
corpus-encoding pipeline.

Rows (`run(device, quick) -> list[dict]`):

* `retrieve_qure`  — QuRe/BLIP-2 scoring: queries [Nq, 256] against corpus features
  [N, 32, 256], score = max over the 32 tokens, top 50 per query, the reference excluded.
  jax: `cirjax.eval.retrieval.top_k` (`retrieval.default_path`: on CPU the "host" path,
  each query block's scores computed on the devices in blocks whose token-score tile fits
  the cache, then ranked by `host_top_k` in NumPy; on GPU "streamed", a running `lax.top_k`
  over corpus blocks). torch: the same scores with `einsum` + `amax` + `topk` per 256-query
  block over the whole corpus. The jax row's `speedup_vs_torch` = torch time / jax time.
  Both start from host (NumPy) features and end with host results, so transfers are
  counted on both sides; samples/s = queries ranked per second. jax and torch are timed in
  alternation (medians of at least `iters` rounds and 2 s timed, each timed call after an
  untimed one of the same side: `_interleaved`), so a shared machine's drifting load hits
  both alike.
* `retrieve_single` — the same with one feature per image ([N, 256], InstructCIR/LLaVA);
  torch: one GEMM (`q @ c.T`) + `topk` per 256-query block; jax on CPU: one GEMM per query
  block of up to 16 MiB of scores (`retrieval.default_query_block`) + `host_top_k`.
* `retrieve_qure_cirr`, `retrieve_single_cirr`, `retrieve_qure_fiq_shirt`,
  `retrieve_single_fiq_shirt` — the same two at the evaluation sizes of CIRR's validation
  split (4,181 queries over 2,297 images) and FashionIQ's largest validation category
  (shirt: 2,038 queries over 6,346 images); not in `--quick`.
* `encode_pipeline` — `cirjax.eval.evaluate.encode_split` on a generated synthetic split with a
  trivial jitted encoder: images/s through loading, preprocessing (QuRe target pad, 224 px),
  host->device transfer and the sharded jitted call. The model's own cost is measured by
  bench_blip2_encode.py; this row says how fast the input pipeline can feed it.

`python benchmarks/bench_eval.py [--device cpu|gpu] [--quick]` writes
benchmarks/results/eval_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 50


def _sizes(device: str, quick: bool) -> dict:
  if quick:
    return {"nq": 128, "n": 2048, "tokens": 32, "dim": 256, "iters": 2, "min_s": 0.0,
            "enc_images": 256}
  if device == "gpu":  # CIRCO-sized corpus (123,403 COCO images), CIRR-test-sized query set
    return {"nq": 4096, "n": 123403, "tokens": 32, "dim": 256, "iters": 5, "min_s": 2.0,
            "enc_images": 4096}
  # min_s: rounds go on past `iters` until this many seconds are timed (at most 51): a row of
  # a few milliseconds timed 3 times had medians 20-30 % apart from run to run.
  return {"nq": 512, "n": 8192, "tokens": 32, "dim": 256, "iters": 3, "min_s": 2.0,
          "enc_images": 1024}


# (row suffix, queries, corpus images) of real evaluation splits (docs/data.md).
DATASET_SIZES = (("cirr", 4181, 2297), ("fiq_shirt", 2038, 6346))


def _features(nq: int, n: int, tokens: int, dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((nq, dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  c = rng.standard_normal((n, tokens, dim), dtype=np.float32)
  c /= np.linalg.norm(c, axis=-1, keepdims=True)
  exclude = rng.integers(0, n, nq).astype(np.int32)
  return q, c, exclude


def _torch_topk(q_np, c_np, exclude, k, tdev, query_block=256):
  import torch  # pylint: disable=g-import-not-at-top
  dev = torch.device(tdev)
  c = torch.from_numpy(c_np).to(dev)
  q_all = torch.from_numpy(q_np).to(dev)
  ex = torch.from_numpy(exclude.astype(np.int64)).to(dev)
  out_s, out_i = [], []
  with torch.no_grad():
    for q0 in range(0, q_all.shape[0], query_block):
      q = q_all[q0:q0 + query_block]
      # One feature per image: a single GEMM (the strongest torch formulation).
      s = q @ c[:, 0].T if c.shape[1] == 1 else torch.einsum("qd,ntd->qnt", q, c).amax(-1)
      s.scatter_(1, ex[q0:q0 + query_block, None], float("-inf"))
      v, i = torch.topk(s, k, dim=1)
      out_s.append(v)
      out_i.append(i)
  return torch.cat(out_s).cpu().numpy(), torch.cat(out_i).cpu().numpy()


_MAX_ROUNDS = 51


def _interleaved(fns: dict, iters: int, dry_run=None, program: str = "",
                 min_s: float = 0.0) -> dict:
  """Median/min/mean seconds of each function, timed in alternation (at least `iters` rounds
  after one warm-up call each, more until `min_s` seconds are timed, at most 51): a shared
  machine's load drifts, and alternating exposes every implementation to the same drift
  (timing them one after the other did not). Each timed call follows an untimed call of the
  same function, as the other suites' warm-up calls do: torch's OpenMP workers spin for
  milliseconds after each parallel region (libgomp's default), on the cores the next call
  needs; a 10 ms jax retrieval timed straight after torch's took 13.5 ms, 10.1 ms with
  torch's workers set to sleep instead (OMP_WAIT_POLICY=passive; torch's own time the same),
  and XLA's pool does the same to torch. In a dry run: each called once."""
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  if dry_run is not None:
    return {name: dry_run.run_once(program, fn, name)[0] for name, fn in fns.items()}
  for fn in fns.values():
    benchmarking.block(fn())
  samples = {name: [] for name in fns}
  rounds = 0
  while rounds < iters or (sum(map(sum, samples.values())) < min_s and rounds < _MAX_ROUNDS):
    for name, fn in fns.items():
      benchmarking.block(fn())  # the other implementation's idle threads settle meanwhile
      t0 = time.perf_counter()
      benchmarking.block(fn())
      samples[name].append(time.perf_counter() - t0)
    rounds += 1
  return {name: {"median_s": statistics.median(s), "min_s": min(s),
                 "mean_s": statistics.fmean(s), "iters": rounds, "warmup": 1,
                 "settle_calls_per_round": 1, "interleaved": True}
          for name, s in samples.items()}


def _dry_compile_step(name: str, scorer, mesh, dry_run) -> None:
  """A dry run's build / compile / CUDA lowering of the jitted ranking program `top_k` runs
  on an accelerator for each query block (the "streamed" path, at the block shapes it
  picks), recorded as `name`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  from cirjax.eval import placement, retrieval  # pylint: disable=g-import-not-at-top
  rank, qb = retrieval.ranking_program(scorer, K, "streamed")
  rows = placement.replicated(np.arange(qb, dtype=np.int32), mesh)
  benchmarking.compile_program(name, rank, scorer.query_rows, scorer.corpus_rows, rows, rows,
                               dry_run=dry_run)


def _retrieval_rows(name: str, sz: dict, tokens: int, device: str, dry_run=None) -> list[dict]:
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  from cirjax.eval import retrieval  # pylint: disable=g-import-not-at-top
  nq, n, dim = sz["nq"], sz["n"], sz["dim"]
  q, c, exclude = _features(nq, n, tokens, dim)
  feats = c if tokens > 1 else c[:, 0]
  mesh = retrieval.make_mesh()
  scorer = retrieval.FeatureScorer(q, feats)
  tdev = benchmarking.torch_device(device, dry_run)
  if dry_run is not None:
    _dry_compile_step(name, scorer, mesh, dry_run)
  flops = 2.0 * nq * n * tokens * dim
  shapes = {"queries": nq, "corpus": n, "tokens": tokens, "dim": dim, "k": K,
            "devices": mesh.devices.size}
  rows = []
  # A scorer per call: it places the host features on the mesh, so the transfer is timed.
  fns = {"jax": lambda: retrieval.top_k(retrieval.FeatureScorer(q, feats, mesh=mesh), K,
                                        exclude, mesh)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    fns["torch"] = lambda: _torch_topk(q, feats if tokens > 1 else feats[:, None], exclude,
                                       K, tdev)
  except ImportError:
    torch = None
  timing = _interleaved(fns, sz["iters"], dry_run, name, sz["min_s"])
  t = timing["jax"]
  js, ji = retrieval.top_k(scorer, K, exclude, mesh)
  rows.append({"name": name, "impl": "jax", "step_time_s": t["median_s"],
               "samples_per_s": nq / t["median_s"], "flops": flops, "batch": nq,
               "corpus_per_s": n * nq / t["median_s"], "shapes": shapes, "timing": t})
  if torch is None:
    return rows
  t = timing["torch"]
  ts, ti = _torch_topk(q, c if tokens > 1 else c[:, :1], exclude, K, tdev)
  # Same embeddings, same answer: ids agree wherever scores are not tied within fp32 noise.
  agree = float((ji == ti).mean())
  np.testing.assert_allclose(js, ts, rtol=1e-4, atol=1e-5)
  rows[0]["agreement_with_torch"] = agree
  rows[0]["speedup_vs_torch"] = t["median_s"] / rows[0]["step_time_s"]
  rows.append({"name": name, "impl": "torch", "step_time_s": t["median_s"],
               "samples_per_s": nq / t["median_s"], "flops": flops, "batch": nq,
               "corpus_per_s": n * nq / t["median_s"], "shapes": shapes, "timing": t,
               "torch_threads": torch.get_num_threads()})
  return rows


def _encode_rows(sz: dict, dry_run=None) -> list[dict]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cirjax.data import images, loader, synth  # pylint: disable=g-import-not-at-top
  from cirjax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from cirjax.eval import evaluate, model as model_lib, retrieval  # pylint: disable=g-import-not-at-top
  n = sz["enc_images"]
  nq = max(64, n // 4)
  with tempfile.TemporaryDirectory() as tmp:
    cfg = synth.SynthConfig(seed=0, resolution=64, num_images=(100, n, 40),
                            num_queries=(5, nq, 5))
    synth.generate(tmp, cfg, progress=None)
    split = synth.read_synthetic(tmp, "val")
    tok = load_tokenizer(Path(tmp) / "vocab.txt", "blip2")
    w = jnp.ones((3, 256), jnp.float32) / 3.0

    # A trivial stand-in for the model: isolates the input pipeline.
    trivial = model_lib.RetrievalFns(
        w, lambda w, px: jnp.einsum("bhwc,cd->bd", px, w)[:, None, :],
        lambda w, px, ids, mask: jnp.einsum("bhwc,cd->bd", px, w) + mask.sum(-1, keepdims=True))

    tf = images.make_transform("targetpad", 224)
    mesh = retrieval.make_mesh()
    threads = min(8, os.cpu_count() or 1)
    def encode():
      return evaluate.encode_split(trivial, split, tf, loader.bert_tokenize_fn(tok), 64,
                                   mesh=mesh, num_threads=threads, log=None)
    if dry_run is None:
      encode()  # warm-up (compilation), then one timed pass
      t0 = time.perf_counter()
      _, timings = encode()
      total = time.perf_counter() - t0
    else:
      t, (_, timings) = dry_run.run_once("encode_pipeline", encode)
      total = t["median_s"]
  return [{"name": "encode_pipeline", "impl": "jax", "step_time_s": total,
           "samples_per_s": timings["corpus_images_per_s"],
           "queries_per_s": timings["queries_encoded_per_s"], "batch": 64,
           "shapes": {"images": n, "queries": len(split.queries), "image_size": 224,
                      "source_resolution": 64, "threads": threads,
                      "devices": mesh.devices.size},
           "note": "trivial jitted encoder: load + preprocess + transfer throughput"}]


def run(device: str = "cpu", quick: bool = False, dry_run=None) -> list[dict]:
  """Benchmark rows (see the module docstring); `dry_run`: a `benchmarking.DryRun`: the
  `device` path run once on the CPU."""
  sz = _sizes(device, quick)
  rows = _retrieval_rows("retrieve_qure", sz, sz["tokens"], device, dry_run)
  rows += _retrieval_rows("retrieve_single", sz, 1, device, dry_run)
  if not quick and dry_run is None:
    for suffix, nq, n in DATASET_SIZES:
      at = {**sz, "nq": nq, "n": n}
      rows += _retrieval_rows(f"retrieve_qure_{suffix}", at, sz["tokens"], device)
      rows += _retrieval_rows(f"retrieve_single_{suffix}", at, 1, device)
  rows += _encode_rows(sz, dry_run)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default cpu")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  p.add_argument("--dry-run", action="store_true",
                 help="the --device gpu path once through on this CPU at quick sizes (as "
                 "`cirjax bench --dry-run`); writes <out>/dryrun/")
  args = p.parse_args(argv)
  if args.dry_run:
    from cirjax.commands import bench  # pylint: disable=g-import-not-at-top
    return bench.script_dry_run(__file__, args.device, args.out)
  args.device = args.device or "cpu"
  if args.device == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  rows = run(args.device, args.quick)
  path = benchmarking.write_results(f"eval_{args.device}", rows, args.out,
                                    extra={"quick": args.quick})
  print(benchmarking.format_table(rows, ["name", "impl", "batch", "step_time_s", "samples_per_s",
                                         "corpus_per_s", "queries_per_s", "speedup_vs_torch"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
