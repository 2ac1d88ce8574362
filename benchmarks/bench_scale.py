"""Scale rehearsal: QuRe training at CIRR size in bounded host memory, measured on CPU.

Generates (once, into a cache directory) a CIRR-layout corpus of JPEG files at CIRR-like
resolutions (400-800 x 300-600 px) with CIRR's split sizes — 16,939 training images,
28,225 training queries, 2,297 validation images, 4,181 validation queries — or a fraction
of them, then runs `cirjax train` (the QuRe task, `configs/qure_blip2_cirr.py` with the
overrides below) in subprocesses while a thread samples each one's /proc/<pid>/status:

* the model: a CLIP-L-shaped vision tower (224 px, patch 14, width 1024: 257 x 1024 features
  per image, like ViT-L) at reduced depth (`--vit-layers`, default 1) and a narrow Q-Former,
  so that the corpus-sized state has its real size while the compute fits a CPU;
* `cached`: the frozen-feature store is built (fp16), one epoch of steps, one mining round
  at the start of the second epoch, a few steps, one evaluation;
* `cached_2proc`: the same as two processes on this machine (one fake CPU device each,
  gloo collectives), sharing one workdir and so one store file, each encoding its share;
* `baseline_1k`: the same run with a 1,000-image training corpus, for the memory that does
  not grow with the corpus;
* `uncached`: pixels through the (frozen) ViT every step, a few steps, for the share of step
  time spent waiting for data; its images come from the pixel store (decoded once, before
  training, into `<workdir>/pixel_store`; its size and build time are reported);
* `uncached_grain`: the same run through the grain pipeline (`data.pipeline=grain`): the
  corpus is built once as TFDS ArrayRecords (`cirjax data tfds`, into `<cache>/tfds`, its
  build time reported), the queries are read from them by `GRAIN_WORKERS` grain worker
  processes and the pixel store is decoded from their images. Run right after `uncached`
  in one invocation, the two rows give both pipelines' data wait under the same load.

Every row reports peak RSS per process (VmHWM, and the peaks of its anonymous and file-backed
parts, sampled every 0.2 s: mapped store pages are file-backed and shared by the processes),
the store's size, location and build time, images/s encoded into it, the mining round's time
split into encoding, scoring and set extraction, and the data-wait share of step time. A
FashionIQ-scale estimate (clearly labelled `extrapolated`) scales the measured per-image and
per-query costs to FashionIQ's official split sizes.

  python benchmarks/bench_scale.py [--quick] [--fraction F] [--cache-dir DIR] [--rows R,...]
  cirjax bench --suite scale [--quick]      # fraction from CIRJAX_SCALE_FRACTION

`--rows` (or CIRJAX_SCALE_ROWS) runs only the named rows (`cached_2proc`, `cached`,
`baseline_1k`, `uncached`, `uncached_grain`); the script then replaces those rows in an
existing results file and keeps the others. Each row records the machine's load average before and after it.

`--quick` uses a 2 % corpus and a depth-0 vision tower (patch embedding only): a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

CIRR = {"train_images": 16939, "train_queries": 28225, "val_images": 2297, "val_queries": 4181}
# FashionIQ's official image splits (train, val) and triplets per category.
FASHIONIQ = {"images": {"dress": (11452, 3817), "shirt": (19036, 6346), "toptee": (16121, 5373)},
             "train_triplets": 18000, "val_triplets": 6016}
FEATURE_SHAPE = (257, 1024)
WORDS = ("red blue green black white small large striped dotted plain left right top bottom "
         "change make it the a with without more less and to is are bigger smaller brighter "
         "darker two one dog cat car tree house person").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GRAIN_WORKERS = 2  # the configs' default data.grain_workers


# ------------------------------------------------------------------------------ the corpus

def _sizes(fraction: float, query_fraction: float | None = None,
           train_images: int | None = None) -> dict:
  """CIRR's sizes times `fraction` (images) and `query_fraction` (queries; default the
  same): fewer queries shorten the epoch before the mining round while the corpus-sized
  state keeps its size."""
  qf = fraction if query_fraction is None else query_fraction
  s = {k: max(60 if "images" in k else 64, int(round(v * (fraction if "images" in k else qf))))
       for k, v in CIRR.items()}
  if train_images:
    s["train_images"] = min(train_images, s["train_images"])
  return s


def _image(rng: np.random.Generator, path: Path) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = int(rng.integers(400, 801)), int(rng.integers(300, 601))
  small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
  Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path, quality=90)


def _split(root: Path, rng, split: str, n_images: int, n_queries: int) -> None:
  names = [f"{split}-{i}" for i in range(n_images)]
  img_dir = root / split
  img_dir.mkdir(parents=True, exist_ok=True)
  for n in names:
    _image(rng, img_dir / f"{n}.jpg")
  entries = []
  for q in range(n_queries):
    members = [names[int(i)] for i in rng.choice(n_images, 6, replace=False)]
    caption = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 8))
    entries.append({"pairid": q, "reference": members[0], "target_hard": members[1],
                    "target_soft": {members[1]: 1.0}, "caption": caption,
                    "img_set": {"id": q, "members": members}})
  (root / "captions").mkdir(exist_ok=True)
  (root / "image_splits").mkdir(exist_ok=True)
  (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
  (root / "image_splits" / f"split.rc2.{split}.json").write_text(
      json.dumps({n: f"./{split}/{n}.jpg" for n in names}))


def ensure_corpus(cache_dir: Path, sizes: dict) -> tuple[Path, float]:
  """The CIRR-layout corpus of `sizes` under `cache_dir` (generated on first use); returns
  (root, seconds spent generating, 0 when it was there)."""
  root = cache_dir / ("cirr_{train_images}_{train_queries}_{val_images}_{val_queries}"
                      .format(**sizes))
  if (root / "done").is_file():
    return root, 0.0
  t0 = time.perf_counter()
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  _split(root, rng, "train", sizes["train_images"], sizes["train_queries"])
  _split(root, rng, "val", sizes["val_images"], sizes["val_queries"])
  (root / "vocab.txt").write_text("\n".join(SPECIALS + sorted(set(WORDS))) + "\n")
  (root / "done").write_text(json.dumps(sizes))
  return root, time.perf_counter() - t0


def ensure_tfds(cache_dir: Path, root: Path) -> tuple[Path, float]:
  """The TFDS (ArrayRecord) build of the corpus at `root`, made once under
  `<cache_dir>/tfds/<corpus>`; (its data_dir, seconds spent building, 0 when it was there)."""
  from cirjax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  data_dir = cache_dir / "tfds" / root.name
  done = data_dir / "done"
  if done.is_file():
    return data_dir, 0.0
  t0 = time.perf_counter()
  tfds_builders.build("cirr", root, data_dir)
  done.write_text(str(root))
  return data_dir, time.perf_counter() - t0


# ------------------------------------------------------------------------------ memory sampling

_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


class RssSampler(threading.Thread):
  """Peaks of a process's VmHWM / VmRSS / RssAnon / RssFile (bytes), sampled in a thread."""

  def __init__(self, pid: int, every_s: float = 0.2):
    super().__init__(daemon=True)
    self.pid, self.every_s = pid, every_s
    self.peak = {f: 0 for f in _FIELDS}
    self._halt = threading.Event()

  def run(self) -> None:
    path = f"/proc/{self.pid}/status"
    while not self._halt.is_set():
      try:
        with open(path) as f:
          for line in f:
            key = line.split(":", 1)[0]
            if key in self.peak:
              self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
      except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return
      self._halt.wait(self.every_s)

  def stop(self) -> dict:
    self._halt.set()
    self.join(timeout=2)
    return {f"peak_{k}_mib": v / 2**20 for k, v in self.peak.items()}


# ------------------------------------------------------------------------------ one run

def _overrides(root: Path, sizes: dict, vit_layers: int, cached: bool, steps: int,
               batch: int) -> list[str]:
  steps_per_epoch = sizes["train_queries"] // batch
  o = {"data.root": str(root), "data.tokenizer": str(root / "vocab.txt"),
       "data.max_text_length": 16, "data.workers": -1,
       "data.pixel_store": "auto" if cached else "on",
       "model.vision.image_size": 224, "model.vision.patch_size": 14,
       "model.vision.hidden_size": 1024, "model.vision.intermediate_size": 4096,
       "model.vision.num_heads": 16, "model.vision.num_layers": vit_layers,
       "model.qformer.hidden_size": 128, "model.qformer.num_layers": 1,
       "model.qformer.num_heads": 2, "model.qformer.intermediate_size": 256,
       "model.num_query_tokens": 8, "model.embed_dim": 64,
       "train.batch_size": batch, "train.epochs": 2, "qure.n_def": 2 if cached else 0,
       "qure.cache_features": cached, "qure.feature_dtype": "float16",
       "qure.encode_batch_size": 32, "compute_dtype": "float32",
       "eval_every_epochs": 100 if cached else 0, "export": False, "tensorboard": False,
       "log_every_steps": 10, "checkpoint.keep": 1,
       "train.max_steps": steps_per_epoch + steps if cached else steps}
  return [f"--config.{k}={v}" for k, v in o.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_train(workdir: Path, overrides: list[str], processes: int = 1,
              timeout_s: float = 3600) -> dict:
  """`cirjax train` as `processes` processes (one CPU device each); peaks and metrics."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  base = [sys.executable, "-m", "cirjax", "train", "--config",
          str(REPO / "configs" / "qure_blip2_cirr.py:tiny"), "--workdir", str(workdir),
          "--cpu-devices", "1", "--platform", "cpu", *overrides]
  port = _free_port()
  procs, samplers, logs = [], [], []
  t0 = time.perf_counter()
  for i in range(processes):
    cmd = base + (["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                   "--process-id", str(i)] if processes > 1 else [])
    log = open(workdir.parent / f"{workdir.name}.p{i}.log", "w")  # pylint: disable=consider-using-with
    logs.append(log)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    s = RssSampler(p.pid)
    s.start()
    samplers.append(s)
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0))))
    except subprocess.TimeoutExpired:
      p.kill()
      codes.append(p.wait())
  peaks = [s.stop() for s in samplers]
  for log in logs:
    log.close()
  if any(codes):
    tail = (workdir.parent / f"{workdir.name}.p0.log").read_text()[-3000:]
    raise RuntimeError(f"cirjax train exited with {codes} in {workdir}:\n{tail}")
  return {"wall_s": time.perf_counter() - t0, "processes": peaks, **_read_metrics(workdir)}


def _read_metrics(workdir: Path) -> dict:
  out: dict = {}
  recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  for r in recs:
    if r["kind"] == "mining":
      out.update({k: r[k] for k in r if k.startswith("mining_")})
    elif r["kind"] == "data":  # per epoch; the first is the full one before mining
      out.setdefault("data_wait_share_by_epoch", []).append(r["data_wait_fraction"])
      out.setdefault("data_wait_share", r["data_wait_fraction"])
    elif r["kind"] == "train" and "step_time_s" in r:
      out["step_time_s"] = r["step_time_s"]
  res = workdir / "final_metrics.json"
  if res.is_file():
    out["step_time_s"] = json.loads(res.read_text()).get("step_time_s")
  for side in (workdir / "pixel_store").glob("pixels_*.json"):
    meta = json.loads(side.read_text())
    out.update(pixel_store_path=str(side.with_suffix(".bin")), pixel_store_shape=meta["shape"],
               pixel_store_dtype=meta["dtype"],
               pixel_store_bytes=side.with_suffix(".bin").stat().st_size,
               pixel_store_build_s=meta.get("build_s"),
               pixel_store_images_per_s=meta.get("images_per_s"))
  for side in (workdir / "feature_store").glob("vision_*.json"):
    meta = json.loads(side.read_text())
    out.update(store_path=str(side.with_suffix(".bin")), store_shape=meta["shape"],
               store_dtype=meta["dtype"], store_bytes=side.with_suffix(".bin").stat().st_size,
               store_build_s=meta.get("build_s"), store_encode_s=meta.get("encode_s"),
               store_images_per_s=meta.get("images_per_s")
               or meta["shape"][0] / max(meta.get("build_s") or 1e-9, 1e-9))
  return out


# ------------------------------------------------------------------------------ the suite

def _fashioniq_estimate(row: dict, sizes: dict) -> dict:
  """FashionIQ-scale numbers from the measured CIRR-scale row: store bytes per image,
  encode images/s, mining seconds per (query x corpus entry) and RSS beyond the store."""
  per_image = int(np.prod(FEATURE_SHAPE)) * 2
  train_imgs = sum(t for t, _ in FASHIONIQ["images"].values())
  all_imgs = sum(t + v for t, v in FASHIONIQ["images"].values())
  pairs = sum((FASHIONIQ["train_triplets"] / 3) ** 2 for _ in range(3))  # per-category corpora
  measured_pairs = sizes["train_queries"] * sizes["train_images"]  # CIRR: one corpus
  score = row.get("mining_score_s") or 0.0
  sets = row.get("mining_sets_s") or 0.0
  ips = row.get("store_images_per_s") or float("nan")
  return {"name": "fashioniq_estimate", "variant": "extrapolated", "impl": "jax",
          "store_images": all_imgs, "store_bytes": all_imgs * per_image,
          "store_bytes_train_split_only": train_imgs * per_image,
          "pixel_store_bytes": all_imgs * 224 * 224 * 3,
          "store_build_s_at_measured_rate": all_imgs / ips,
          "mining_score_s": score * pairs / measured_pairs,
          "mining_sets_s": sets * pairs / measured_pairs,
          "note": "extrapolated from the measured CIRR-fraction row: store = images x 257 x "
                  "1024 x 2 B (fp16; 62k = the three categories' train+val image splits), "
                  "pixel store (runs that feed pixels) = images x 224 x 224 x 3 B, "
                  "mining cost scaled by queries x corpus entries (per-category corpora of "
                  "~6k triplet targets), encode time at the measured images/s; not run"}


ROWS = ("cached_2proc", "cached", "baseline_1k", "uncached", "uncached_grain")


def _rows_arg(rows) -> tuple[str, ...]:
  if rows is None:
    rows = os.environ.get("CIRJAX_SCALE_ROWS", "") or ROWS
  if isinstance(rows, str):
    rows = [r.strip() for r in rows.split(",") if r.strip()]
  bad = [r for r in rows if r not in ROWS]
  if bad or not rows:
    raise ValueError(f"rows {bad or rows!r}: choose from {', '.join(ROWS)}")
  return tuple(rows)


def run(device: str = "cpu", quick: bool = False, fraction: float | None = None,
        cache_dir: str | None = None, vit_layers: int | None = None, steps: int = 4,
        query_fraction: float | None = None, rows: str | tuple | None = None) -> dict:
  """The suite: rows for the baseline, the cached run (1 and 2 processes) and the uncached
  run, plus the FashionIQ estimate (when the cached row ran); `rows` picks some of them."""
  if device != "cpu":
    raise ValueError("the scale rehearsal runs on CPU (it measures host memory)")
  only = _rows_arg(rows)
  if fraction is None:
    fraction = float(os.environ.get("CIRJAX_SCALE_FRACTION", "0.02" if quick else "1.0"))
  if query_fraction is None and os.environ.get("CIRJAX_SCALE_QUERY_FRACTION"):
    query_fraction = float(os.environ["CIRJAX_SCALE_QUERY_FRACTION"])
  vit_layers = (0 if quick else 1) if vit_layers is None else vit_layers
  cache = Path(os.path.expanduser(cache_dir or os.environ.get(
      "CIRJAX_SCALE_CACHE", "~/.cache/cirjax/scale")))
  work = cache / "runs"
  work.mkdir(parents=True, exist_ok=True)
  sizes = _sizes(fraction, query_fraction)
  base_sizes = _sizes(fraction, query_fraction, train_images=1000)
  out_rows, gen = [], {}
  batch = 32
  # The uncached run measures input throughput: a small validation set keeps its final
  # evaluation (pixels through the ViT) short.
  uncached_sizes = dict(base_sizes, val_images=60, val_queries=64)
  plan = [("cached_2proc", sizes, True, 2), ("cached", sizes, True, 1),
          ("baseline_1k", base_sizes, True, 1), ("uncached", uncached_sizes, False, 1),
          ("uncached_grain", uncached_sizes, False, 1)]
  for name, sz, cached, nproc in plan:
    if name not in only or (name == "baseline_1k" and sz == sizes):
      continue  # not asked for, or the measured corpus is not larger than the baseline's
    root, gen[name] = ensure_corpus(cache, sz)
    wd = work / name
    subprocess.run(["rm", "-rf", str(wd)], check=True)
    overrides = _overrides(root, sz, vit_layers, cached, steps, batch)
    facts = {"pipeline": "prefetch"}
    if name.endswith("_grain"):
      tfds_dir, facts["tfds_build_s"] = ensure_tfds(cache, root)
      overrides += ["--config.data.pipeline=grain", f"--config.data.tfds_dir={tfds_dir}",
                    f"--config.data.grain_workers={GRAIN_WORKERS}"]
      facts.update(pipeline="grain", grain_workers=GRAIN_WORKERS)
    print(f"[scale] {name}: {sz} ({nproc} process(es))", flush=True)
    load0 = os.getloadavg()[0]
    res = run_train(wd, overrides, nproc)
    procs = res.pop("processes")
    res.update(load_avg_1m_before=load0, load_avg_1m_after=os.getloadavg()[0],
               measured=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    row = {"name": name, "impl": "jax", "variant": f"{nproc}proc", "batch": batch,
           "fraction": fraction,
           "query_fraction": fraction if query_fraction is None else query_fraction,
           "vit_layers": vit_layers, "steps": steps, **facts,
           **{f"n_{k}": v for k, v in sz.items()},
           **res}
    for i, p in enumerate(procs):
      row.update({f"p{i}_{k}": v for k, v in p.items()})
    row["peak_memory_mib"] = max(p["peak_VmHWM_mib"] for p in procs)
    out_rows.append(row)
    print(f"[scale] {name}: " + json.dumps({k: v for k, v in row.items()
                                             if not k.startswith("n_")}, default=str), flush=True)
  cached = next((r for r in out_rows if r["name"] == "cached"), None)
  if cached is not None:
    out_rows.append(_fashioniq_estimate(cached, sizes))
  return {"rows": out_rows, "corpus_generation_s": gen, "cache_dir": str(cache),
          "label": f"CIRR images x {fraction:g}, queries x "
                   f"{fraction if query_fraction is None else query_fraction:g}, ViT depth "
                   f"{vit_layers}, measured on CPU ({os.cpu_count()} cores, shared)"}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--fraction", type=float, default=None,
                  help="share of CIRR's sizes to generate and run (default 1, quick 0.02)")
  ap.add_argument("--query-fraction", type=float, default=None,
                  help="share of CIRR's query counts (default: --fraction)")
  ap.add_argument("--cache-dir", default=None, help="corpus and run directory "
                  "(default $CIRJAX_SCALE_CACHE or ~/.cache/cirjax/scale)")
  ap.add_argument("--vit-layers", type=int, default=None, help="vision depth (default 1, quick 0)")
  ap.add_argument("--steps", type=int, default=4, help="steps after the mining round")
  ap.add_argument("--rows", default=None,
                  help=f"comma-separated rows to run (default all: {','.join(ROWS)}); the "
                       "others of an existing results file are kept")
  ap.add_argument("--note", default="", help="conditions to record with the rows run")
  ap.add_argument("--out", default=str(HERE / "results"))
  args = ap.parse_args(argv)
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  only = _rows_arg(args.rows)
  res = run("cpu", args.quick, args.fraction, args.cache_dir, args.vit_layers, args.steps,
            args.query_fraction, only)
  rows = res.pop("rows")
  for r in rows:
    r.update(label=res["label"], **({"note": args.note} if args.note else {}))
  path = Path(args.out) / "scale_cpu.json"
  if set(only) != set(ROWS) and path.is_file():
    path = _merge_rows(path, rows)
  else:
    path = benchmarking.write_results("scale_cpu", rows, args.out,
                                      extra={"quick": args.quick, **res})
  print(f"[scale] wrote {path}")
  return 0


def _merge_rows(path: Path, rows: list[dict]) -> Path:
  """Replaces the rows of `path` that have the names of `rows` (each labelled with its own
  conditions) and keeps the others and the file's other fields."""
  payload = json.loads(path.read_text())
  new = {r["name"]: r for r in rows}
  kept = [r for r in payload.get("rows", []) if r.get("name") not in new]
  order = [r.get("name") for r in payload.get("rows", [])]
  merged = kept + list(new.values())
  merged.sort(key=lambda r: order.index(r["name"]) if r.get("name") in order else len(order))
  payload["rows"] = merged
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
  os.replace(tmp, path)
  return path


if __name__ == "__main__":
  sys.exit(main())
