"""Full-depth compile time and XLA memory of the two train steps, without running them.

Each program is the real train step (`cirjax.train.step.make_train_step` around the task's own
`loss_fn`, the optimizer of `cirjax.train.state`, the train settings of the config files) at
full depth, real widths and the paper's per-device batch, lowered from `jax.ShapeDtypeStruct`s
(no weight is ever allocated) and compiled, once with Python-loop layers and once with
`scan_layers`. Rows report lower and compile seconds and `compiled.memory_analysis()`
(argument, output, temp bytes per device), so the fit on an 80 GB GPU can be read before a GPU
is used. Programs:

* `qure_step_cached`: QuRe (configs/qure_blip2_cirr.py): CLIP-L ViT (23 blocks, frozen, its
  features cached: the step runs `ln_vision` + Q-Former 12 layers + heads), batch 32, bf16.
* `qure_step_pixels`: the same with pixels in: the frozen ViT runs in the step for 3B images.
* `instructcir_lora_step`: InstructCIR stage 2 (configs/instructcir_stage2.py): CLIP-L (24)
  + Phi-3.5-mini (32 layers), LoRA r=64 on every LLM projection, remat, bf16, per-device
  batch 64, query prompts of 640 tokens (576 image tokens), captions of 64.

With the loop, a third row per program (`loop_one_step`) compiles the same step with each run
of layers cut to one scan step (one ViT / Phi-3 layer, one Q-Former pair), unrolled: no layer
loop compiles less code than that, so `scan_speedup_ceiling` (loop seconds / its seconds, on
the scanned row) bounds what scanning can save. `kernels` / `unique_kernels` count the fused
computations of the optimized program and the distinct ones: XLA's CPU backend generates code
once per distinct fusion, so an unrolled stack adds HLO passes but little code generation.

`flops` is XLA's static count of the looped program (it counts a scan's body once, so scanned
rows leave it empty). On CPU the memory is the CPU compiler's plan (its fusion and scheduling differ from a GPU's):
read it as the size of the program, not a GPU measurement. Compile seconds on a shared CPU
are inflated by its other load.

`python benchmarks/bench_compile.py [--quick] [--vision-layers N] [--text-layers N]
[--qformer-layers N] [--no-loop [--keep-loop-rows]] [--remat] [--remat-policy NAME]` writes benchmarks/results/compile_cpu.json;
`cirjax bench --suite compile` runs the same at full depth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from cirjax import benchmarking  # pylint: disable=g-import-not-at-top,wrong-import-position
from cirjax import lora as lora_lib  # pylint: disable=wrong-import-position
from cirjax.models import blip2, llava, llava_init  # pylint: disable=wrong-import-position
from cirjax.models.remat import REMAT_POLICIES  # pylint: disable=wrong-import-position
from cirjax.train import instructcir, qure  # pylint: disable=wrong-import-position
from cirjax.train import state as st  # pylint: disable=wrong-import-position
from cirjax.train.step import make_train_step, memory_summary  # pylint: disable=wrong-import-position

QURE_CONFIG = HERE.parent / "configs" / "qure_blip2_cirr.py"
INSTRUCTCIR_CONFIG = HERE.parent / "configs" / "instructcir_stage2.py"
Q_LEN, T_LEN = 640, 64   # InstructCIR prompt lengths (576 image tokens + instruction; caption)
LLAVA_VOCAB, IMAGE_TOKEN = 32064, 32000


def _config(path: Path, arg: str = "") -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def _sizes(quick: bool, overrides: dict) -> dict:
  if quick:
    s = dict(vision_layers=2, qformer_layers=2, text_layers=2, qure_batch=4, ic_batch=2,
             q_len=48, t_len=16, small=True)
  else:
    s = dict(vision_layers=None, qformer_layers=None, text_layers=None, qure_batch=32,
             ic_batch=64, q_len=Q_LEN, t_len=T_LEN, small=False)
  s.update({k: v for k, v in overrides.items() if v is not None})
  return s


def _run_options(config: ml_collections.ConfigDict, sz: dict, scan: bool) -> None:
  """The run's layer loop and remat settings, where the tasks read them (`task.run_options`)."""
  config.scan_layers = scan
  if sz.get("remat"):
    config.remat = True
  if sz.get("remat_policy"):
    config.remat_policy = sz["remat_policy"]


def _compile(loss_fn, abstract_params, config, batch_spec, stacks) -> dict:
  """Lowers and compiles the real step on abstract state; seconds and memory. Under
  `scan_layers` the state holds `stacks` stacked, as the trainer's does (no stacking in the
  step)."""
  mask = st.trainable_mask(abstract_params, tuple(config.get("freeze", ())),
                           tuple(config.get("train_only", ())))
  if config.scan_layers:
    abstract_params, mask = st.stacked_params_and_mask(abstract_params, mask, stacks)
  tx, schedule = st.make_optimizer(config.train, mask, 1000, 10000)
  step = make_train_step(loss_fn, tx, mask, schedule=schedule,
                         compute_dtype=config.get("compute_dtype", "float32"),
                         cast_in_layers=stacks if config.scan_layers else ())
  abstract = jax.eval_shape(lambda p: st.init_state(p, tx), abstract_params)
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jax.jit(step, donate_argnums=(0,)).lower(abstract, batch_spec)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  total, trained = st.count_params(abstract_params, mask)
  mem = memory_summary(compiled)
  cost = benchmarking.compiled_cost(compiled)
  kernels, unique = benchmarking.kernel_counts(compiled)
  # CPU seconds too: wall time on a shared machine also counts the other processes' load.
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_total_s": t2 - t0,
          "compile_cpu_s": c2 - c0,
          "params": total, "trained_params": trained,
          **{f"{k}_bytes": v for k, v in mem.items()},
          "peak_memory_bytes": cost["peak_memory_bytes"], "flops": cost["flops"],
          "kernels": kernels, "unique_kernels": unique}


def _qure(sz: dict, scan: bool, cached: bool) -> dict:
  config = _config(QURE_CONFIG)
  _run_options(config, sz, scan)
  mc = config.model
  if sz["vision_layers"]:
    mc.vision.num_layers = sz["vision_layers"]
  if sz["qformer_layers"]:
    mc.qformer.num_layers = sz["qformer_layers"]
  cfg = blip2.model_config(mc, mc.qformer.vocab_size).replace(scan_layers=scan)
  # The task's own loss and batch spec, without its data: the attributes they read.
  task = object.__new__(qure.QuReTask)
  task.config = config
  task.cfg, task.compute_dtype = cfg, jnp.dtype(config.compute_dtype)
  task.cache, task.loss_kind = cached, config.qure.get("loss", "pairwise")
  task.global_batch, task.max_len = sz["qure_batch"], int(config.data.max_text_length)
  task.image_size = cfg.vision.image_size
  row = _compile(task.loss_fn, blip2.abstract_params(cfg), config, task.batch_spec(),
                 task.layer_stacks())
  return {"name": "qure_step_cached" if cached else "qure_step_pixels", "batch": task.global_batch,
          "vision_layers": cfg.vision.num_layers, "qformer_layers": cfg.qformer.num_layers,
          "remat": bool(config.remat), "remat_policy": config.remat_policy,
          "compute_dtype": config.compute_dtype, **row}


def _instructcir(sz: dict, scan: bool) -> dict:
  config = _config(INSTRUCTCIR_CONFIG)
  _run_options(config, sz, scan)
  mc = config.model
  if sz["vision_layers"]:
    mc.vision.num_layers = sz["vision_layers"]
  if sz["text_layers"]:
    mc.text.num_layers = sz["text_layers"]
  cfg = llava_init.config_from_widths(mc, LLAVA_VOCAB, IMAGE_TOKEN, config.compute_dtype)
  lora_cfg = lora_lib.config_from(config.lora)
  # Adapters are made on the per-layer tree (PEFT's names); `_compile` stacks both trees.
  base = llava.abstract_params(cfg)
  adapter = jax.eval_shape(lambda r: lora_lib.init_lora(base, lora_cfg, r).params,
                           jax.random.PRNGKey(0))
  cfg = cfg.replace(scan_layers=scan)
  params = {"base": base, "lora": adapter}
  task = object.__new__(instructcir.InstructCIRTask)
  task.config, task.stage, task.cfg, task.lora_cfg = config, 2, cfg, lora_cfg
  task.remat = bool(config.remat)
  task.run_kw = instructcir.run_options(config)
  task.temperature = float(config.loss.temperature)
  task.use_hard_negatives = bool(config.loss.hard_negatives)
  task.hn_scope = config.loss.hard_negative_scope
  task.global_batch, task.q_len, task.t_len = sz["ic_batch"], sz["q_len"], sz["t_len"]
  row = _compile(task.loss_fn, params, config, task.batch_spec(), task.layer_stacks())
  return {"name": "instructcir_lora_step", "batch": task.global_batch,
          "vision_layers": cfg.vision.num_layers, "text_layers": cfg.text.num_layers,
          "q_len": task.q_len, "t_len": task.t_len, "lora_rank": lora_cfg.rank,
          "remat": task.remat, "remat_policy": config.remat_policy,
          "compute_dtype": config.compute_dtype, **row}


def _one_step(sz: dict, name: str) -> dict:
  """Sizes with each layer run cut to one scan step (one ViT / Phi-3 layer, one Q-Former
  pair of layers): that step's layers unrolled are the least code any layer loop compiles."""
  if name.startswith("qure"):
    pair = int(_config(QURE_CONFIG).model.qformer.cross_attention_frequency)
    return {**sz, "vision_layers": 1, "qformer_layers": pair}
  return {**sz, "vision_layers": 1, "text_layers": 1}


def _programs(sz: dict):
  yield "qure_step_cached", lambda scan, s=sz: _qure(s, scan, cached=True)
  yield "qure_step_pixels", lambda scan, s=sz: _qure(s, scan, cached=False)
  yield "instructcir_lora_step", lambda scan, s=sz: _instructcir(s, scan)


def run(device: str = "cpu", quick: bool = False, overrides: dict | None = None,
        loop: bool = True, on_row=None, one_step: bool = True) -> dict:
  """Rows: one per (program, layers scanned / looped), plus `scan_speedup` on scanned rows (the
  scanned program first: it is the quicker one). With the loop and `one_step`, a third row per
  program (`loop_one_step`): the same step with each run of layers cut to one scan step,
  unrolled, and `scan_speedup_ceiling` = loop seconds / its seconds on the scanned row.
  `on_row(rows)` after each row (partial results survive an interrupted run)."""
  sz = _sizes(quick, overrides or {})
  rows = []
  for name, build in _programs(sz):
    by_mode = {}
    for scan in ((True, False) if loop else (True,)):
      print(f"[compile] {name} scan_layers={scan} ...", file=sys.stderr, flush=True)
      row = build(scan)
      if scan:  # XLA's static count takes a while loop's body once, not per iteration
        row["flops"] = None
      row.update(impl="jax", variant="scan" if scan else "loop", scan_layers=scan,
                 device=device, shapes={"batch": row["batch"]})
      print(f"[compile] {name} {row['variant']}: lower {row['lower_s']:.1f}s, compile "
            f"{row['compile_s']:.1f}s, temp {_mib(row['temp_bytes'])} MiB",
            file=sys.stderr, flush=True)
      by_mode[scan] = row
      if len(by_mode) == 2:
        by_mode[True]["scan_speedup"] = row["compile_total_s"] / by_mode[True]["compile_total_s"]
      rows.append(row)
      if on_row is not None:
        on_row(rows)
    if loop and one_step:
      print(f"[compile] {name} one scan step unrolled ...", file=sys.stderr, flush=True)
      row = build(False, _one_step(sz, name))
      row.update(impl="jax", variant="loop_one_step", scan_layers=False, device=device,
                 shapes={"batch": row["batch"]})
      # No layer loop compiles less than its one step unrolled: the most scan could save.
      by_mode[True]["scan_speedup_ceiling"] = (by_mode[False]["compile_total_s"]
                                               / row["compile_total_s"])
      print(f"[compile] {name} loop_one_step: lower {row['lower_s']:.1f}s, compile "
            f"{row['compile_s']:.1f}s; scan speed-up ceiling "
            f"{by_mode[True]['scan_speedup_ceiling']:.2f}x", file=sys.stderr, flush=True)
      rows.append(row)
      if on_row is not None:
        on_row(rows)
  return {"rows": rows, "sizes": sz}


def keep_loop_rows(rows: list, sizes: dict, old: dict | None) -> list:
  """`rows` (scanned only) with the looped rows of the same programs and sizes from the
  earlier results `old`, each marked with that run's date (`from_run`); the scanned rows'
  `scan_speedup` is then against those rows. The looped programs do not depend on the
  scanned layout, but their seconds were measured under that run's load."""
  if not old or old.get("sizes") != sizes:
    return rows
  loops = {r["name"]: r for r in old.get("rows", []) if r.get("variant") == "loop"}
  out = []
  for row in rows:
    out.append(row)
    prev = loops.get(row["name"])
    if prev is not None:
      out.append({**prev, "from_run": old.get("machine", {}).get("date")})
      row["scan_speedup"] = prev["compile_total_s"] / row["compile_total_s"]
  return out


def _mib(n) -> str:
  return "?" if n is None else f"{n / 2**20:.0f}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="2-layer models, small batches")
  p.add_argument("--vision-layers", type=int, default=None, help="override ViT depth")
  p.add_argument("--qformer-layers", type=int, default=None, help="override Q-Former depth")
  p.add_argument("--text-layers", type=int, default=None, help="override Phi-3 depth")
  p.add_argument("--no-loop", action="store_true", help="compile the scanned programs only")
  p.add_argument("--keep-loop-rows", action="store_true",
                 help="with --no-loop: keep the looped rows of the same sizes from the results "
                 "file being replaced (marked with that run's date)")
  p.add_argument("--remat", action="store_true", help="remat on in both programs (QuRe's "
                 "config has it off)")
  p.add_argument("--remat-policy", default=None, choices=sorted(REMAT_POLICIES),
                 help="remat policy (default: the configs', full)")
  p.add_argument("--out", default=str(HERE / "results"))
  a = p.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  overrides = dict(vision_layers=a.vision_layers, qformer_layers=a.qformer_layers,
                   text_layers=a.text_layers, remat=a.remat or None,
                   remat_policy=a.remat_policy)
  extra = {"quick": a.quick, "sizes": _sizes(a.quick, overrides)}
  previous = None
  if a.keep_loop_rows:  # read before the partial writes replace it
    try:
      previous = json.loads((Path(a.out) / "compile_cpu.json").read_text())
    except (OSError, ValueError):
      pass
  partial = lambda rows: benchmarking.write_results("compile_cpu", rows, a.out,
                                                    extra={**extra, "complete": False})
  result = run("cpu", a.quick, overrides, loop=not a.no_loop, on_row=partial)
  if a.no_loop and a.keep_loop_rows:
    result["rows"] = keep_loop_rows(result["rows"], extra["sizes"], previous)
  path = benchmarking.write_results("compile_cpu", result["rows"], a.out,
                                    extra={**extra, "complete": True})
  print(benchmarking.format_table(result["rows"], [
      "name", "variant", "batch", "lower_s", "compile_s", "scan_speedup", "argument_bytes",
      "output_bytes", "temp_bytes"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
