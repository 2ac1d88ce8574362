"""The bad-input matrix: every command answers bad input with one clean error.

Each case runs `cirjax` in-process (`cli.main(argv)`) and checks the exit status (1 an
error, 2 a usage error), that the error is one line starting with the exact
`cirjax <command>: error:` prefix (`cirjax data check: error:` for an action), that stderr
names the culprit (file, key or value), that nothing printed a traceback, and that the
destination / workdir / source tree is byte-for-byte what it was before. Two cases run the real entry point (`python -m cirjax`) to check the same
with and without CIRJAX_DEBUG=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cirjax import cli
from cirjax.convert import io
from tests.blip2_fixtures import hf_retrieval_model, lavis_model, save_runner_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tree_hash(path: Path) -> str:
  """A hash of every file name and content under `path` (or of `path` itself)."""
  h = hashlib.sha256()
  if not path.exists():
    return "absent"
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  for f in files:
    h.update(str(f.relative_to(path) if f != path else f.name).encode())
    h.update(f.read_bytes())
  h.update(str(sorted(str(p) for p in path.rglob("*")) if path.is_dir() else "").encode())
  return h.hexdigest()


def check(argv, status, culprits, watch, capsys):
  """Runs `cirjax argv` and asserts the clean-error contract."""
  before = {str(w): tree_hash(w) for w in watch}
  argv = [str(a) for a in argv]
  try:
    got = cli.main(argv)
  except SystemExit as e:  # argparse's usage errors
    got = e.code
  out, err = capsys.readouterr()
  assert got == status, f"exit {got}, expected {status}\nstderr: {err[-2000:]}"
  assert "Traceback" not in out + err, err
  command = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
  error_lines = [line for line in err.splitlines() if line.startswith("cirjax")
                 and "error:" in line]
  assert len(error_lines) == 1 and error_lines[0].startswith(f"cirjax {command}: error: "), err
  for c in culprits:
    assert str(c) in err, f"{c!r} not named in:\n{err}"
  for w in watch:
    assert tree_hash(w) == before[str(w)], f"{w} changed"
  return err


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory, synth_root):
  """Every bad input of the matrix, built once."""
  d = tmp_path_factory.mktemp("bad")
  f = {"root": synth_root, "tmp": d}
  # HF BLIP-2 directory and its cirjax conversion
  hf = d / "hf"
  hf_retrieval_model(seed=2).save_pretrained(hf)
  (hf / "vocab.txt").write_text((synth_root / "vocab.txt").read_text())
  f["hf"] = hf
  # a cirjax model directory (every case using it fails before its weights are used) and a
  # copy whose params/ metadata is garbage
  cj = d / "cirjax"
  io.save_model_dir(cj, {"w": np.zeros((2, 3), np.float32)}, {}, "blip2")
  f["cirjax"] = cj
  garbled = d / "garbled"
  shutil.copytree(cj, garbled)
  (garbled / "params" / "_METADATA").write_bytes(bytes(range(128, 256)) * 4)
  f["garbled"] = garbled
  # an HF directory with an int8 tensor where a float parameter belongs
  int8 = d / "int8"
  int8.mkdir()
  (int8 / "config.json").write_text((hf / "config.json").read_text())
  state = io.read_state_dict(hf)
  key = next(k for k in sorted(state) if k.endswith("query.weight"))
  state[key] = np.ones(state[key].shape, np.int8)
  io.write_safetensors(state, int8 / "model.safetensors")
  f["int8"], f["int8_key"] = int8, key
  # a config.json holding a list; a text file named like a LAVIS checkpoint
  listcfg = d / "listcfg"
  listcfg.mkdir()
  (listcfg / "config.json").write_text("[1, 2]")
  f["listcfg"] = listcfg
  (d / "x.pth").write_text("hello\n")
  f["textpth"] = d / "x.pth"
  # a dataset whose training captions are truncated
  trunc = d / "trunc"
  shutil.copytree(synth_root, trunc)
  cap = trunc / "captions" / "cap.rc2.train.json"
  cap.write_text(cap.read_text()[:40])
  f["trunc"], f["trunc_file"] = trunc, cap
  # a file where a directory belongs, an existing workdir, a non-empty output directory
  (d / "afile").write_text("x")
  f["afile"] = d / "afile"
  wd = d / "workdir"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  f["workdir"] = wd
  # a workdir in use: its lock names a live process 0 on this host (pid 1 is always alive)
  locked = d / "locked"
  locked.mkdir()
  (locked / "cirjax.lock").write_text(json.dumps(
      {"host": socket.gethostname(), "pid": 1, "pid_start": None, "processes": 2, "job": None,
       "started": "2026-01-01T00:00:00+00:00"}))
  f["locked"] = locked
  # a training workdir (run config + checkpoints/) with neither export nor checkpoint
  run = d / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"task": "qure", "model": {"init": ""}}))
  f["run"] = run
  damaged = d / "damaged_run"
  (damaged / "checkpoints" / "3" / "state").mkdir(parents=True)
  (damaged / "config.json").write_text('{"task": "qu')
  f["damaged_run"] = damaged
  # a config file that is not Python; a file that is not a features cache
  (d / "bad.py").write_text("def get_config(:\n")
  f["badpy"] = d / "bad.py"
  (d / "cache.npz").write_bytes(b"not an npz" * 8)
  f["badcache"] = d / "cache.npz"
  f["ref"] = sorted((synth_root / "images" / "val").iterdir())[0]
  # a LAVIS training-runner checkpoint: the trained tensors only, no frozen ViT
  save_runner_checkpoint(d / "checkpoint_best.pth", lavis_model("clip")[0])
  f["runner"] = d / "checkpoint_best.pth"
  # InstructCIR caption pairs whose second record names a missing image
  ic = d / "instructcir"
  (ic / "img").mkdir(parents=True)
  shutil.copy(f["ref"], ic / "img" / "a.png")
  (ic / "pairs.jsonl").write_text(json.dumps({"image": "img/a.png", "caption": "a cube"}) + "\n"
                                  + json.dumps({"image": "img/gone.png", "caption": "x"}) + "\n")
  f["ic_pairs"] = ic / "pairs.jsonl"
  return f


# ----------------------------------------------------------------------------- the matrix

SYNTH = "configs/synthetic.py:tiny"
CIRR = "configs/qure_blip2_cirr.py:tiny"

TRAIN_CASES = {
    # name: (config, overrides, workdir key or None for a new one, status, culprits)
    "missing dataset root": (CIRR, lambda f: [f"data.root={f['tmp'] / 'nope'}"], None, 1,
                             lambda f: ["config.data.root", f["tmp"] / "nope"]),
    "truncated captions": (SYNTH, lambda f: [f"data.root={f['trunc']}"], None, 1,
                           lambda f: [f["trunc_file"]]),
    "missing model.init": (SYNTH, lambda f: [f"data.root={f['root']}",
                                             f"model.init={f['tmp'] / 'noinit'}"], "workdir",
                           1, lambda f: ["config.model.init", f["tmp"] / "noinit"]),
    "batch larger than dataset": (SYNTH, lambda f: [f"data.root={f['root']}",
                                                    "train.batch_size=128"], "workdir", 1,
                                  lambda f: ["config.train.batch_size", "128"]),
    "negative batch size": (SYNTH, lambda f: [f"data.root={f['root']}", "train.batch_size=-16"],
                            "workdir", 2, lambda f: ["config.train.batch_size=-16"]),
    "workdir is a file": (SYNTH, lambda f: [f"data.root={f['root']}"], "afile", 2,
                          lambda f: [f["afile"], "is a file"]),
    "unknown config key": (SYNTH, lambda f: ["train.nope=1"], "workdir", 2,
                           lambda f: ["train.nope"]),
    "unknown loss": (SYNTH, lambda f: [f"data.root={f['root']}", "qure.loss=bogus"], "workdir",
                     2, lambda f: ["config.qure.loss='bogus'"]),
    "unknown lr schedule": (SYNTH, lambda f: [f"data.root={f['root']}", "train.schedule=bogus"],
                            "workdir", 2, lambda f: ["config.train.schedule", "bogus"]),
    "config file not Python": (None, lambda f: [], "workdir", 2,
                               lambda f: [f"{f['badpy']}:1", "not valid Python"]),
    "bad profile_steps": (SYNTH, lambda f: [f"data.root={f['root']}", "profile_steps=5,2"],
                          "workdir", 2, lambda f: ["config.profile_steps='5,2'"]),
    "process id without a coordinator": (SYNTH, lambda f: ["--num-processes", "2",
                                                            "--process-id", "0"], "workdir", 2,
                                         lambda f: ["--coordinator HOST:PORT"]),
    "old flag spellings, no coordinator": (SYNTH, lambda f: ["--num_processes", "2",
                                                              "--process_id", "0"], "workdir",
                                           2, lambda f: ["--coordinator HOST:PORT",
                                                         "--num_processes is deprecated"]),
    "synthetic set larger than its attribute combinations": (
        SYNTH, lambda f: [f"data.root={f['tmp'] / 'bigsynth'}",
                          "data.synth.num_images=(9999,60,20)"], None, 2,
        lambda f: ["config.data.synth.num_images[0]=9999", "attribute combinations",
                   "config.data.synth.max_duplicates"]),
    "unknown --cluster": (SYNTH, lambda f: ["--cluster", "pbs"], "workdir", 2,
                          lambda f: ["--cluster", "pbs"]),
    "workdir in use by another run": (SYNTH, lambda f: [f"data.root={f['root']}"], "locked", 1,
                                      lambda f: [f"--workdir {f['locked']} is in use",
                                                 "pid 1", f["locked"] / "cirjax.lock"]),
    "real-data config without model.init": ("configs/qure_blip2_cirr.py",
                                            lambda f: [f"data.root={f['root']}"], None, 2,
                                            lambda f: ["config.model.init",
                                                       "--config.model.init=random"]),
    "unknown input pipeline": (SYNTH, lambda f: [f"data.root={f['root']}",
                                                 "data.pipeline=tf.data"], "workdir", 2,
                               lambda f: ["config.data.pipeline='tf.data'"]),
    "grain without a TFDS build": (SYNTH, lambda f: [f"data.root={f['root']}",
                                                     "data.pipeline=grain"], "workdir", 2,
                                   lambda f: ["config.data.tfds_dir"]),
    "grain from an unbuilt TFDS dir": (SYNTH, lambda f: [
        "data.pipeline=grain", f"data.tfds_dir={f['tmp'] / 'notfds'}"], "workdir", 1,
        lambda f: [f["tmp"] / "notfds", "cirjax data tfds"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train(case, files, capsys):
  config, overrides, wd_key, status, culprits = TRAIN_CASES[case]
  wd = files[wd_key] if wd_key else files["tmp"] / f"new-{case.replace(' ', '_')}"
  config = REPO / config if config else files["badpy"]
  check(["train", "--config", config, "--workdir", wd] + overrides(files), status,
        culprits(files), [wd, files["root"], files["tmp"] / "bigsynth"], capsys)


CONVERT_CASES = {
    "config.json holds a list": (lambda f: [f["listcfg"]], 1,
                                 lambda f: [f["listcfg"] / "config.json", "JSON object"]),
    "text file named .pth": (lambda f: [f["textpth"]], 1, lambda f: [f["textpth"]]),
    "garbled params/": (lambda f: [f["garbled"]], 1,
                        lambda f: [f["garbled"] / "params" / "_METADATA"]),
    "int8 tensor for a float parameter": (lambda f: [f["int8"]], 1,
                                          lambda f: [f["int8_key"], "int8"]),
    "missing source": (lambda f: [f["tmp"] / "nosrc"], 1, lambda f: [f["tmp"] / "nosrc"]),
    "negative heads": (lambda f: [f["hf"], "--vision-heads", "-1"], 2,
                       lambda f: ["--vision-heads"]),
    "runner checkpoint without --base": (lambda f: [f["runner"], "--vision-heads", "4"], 1,
                                         lambda f: [f["runner"], "visual_encoder.*",
                                                    "--base PRETRAINED.pth"]),
    "--base for an HF source": (lambda f: [f["hf"], "--base", f["runner"]], 2,
                                lambda f: ["--base", f["runner"]]),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert(case, files, capsys):
  src, status, culprits = CONVERT_CASES[case]
  dst = files["tmp"] / "convert-out"
  args = src(files)
  check(["convert", args[0], dst] + args[1:], status, culprits(files), [dst, Path(args[0])],
        capsys)
  assert not dst.exists()


@pytest.fixture
def offline_hub(files, monkeypatch):
  """No network, and an empty HF cache: a hub id resolves to nothing."""
  cache = files["tmp"] / "hf_cache"
  cache.mkdir(exist_ok=True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  return cache


UNKNOWN_HUB_ID = "cirjax-test/no-such-model"
HUB_CULPRITS = [UNKNOWN_HUB_ID, "HF_HUB_OFFLINE", "hf download"]


def test_unknown_hub_id_offline(files, offline_hub, capsys):
  dst = files["tmp"] / "convert-out"
  check(["convert", UNKNOWN_HUB_ID, dst], 1, HUB_CULPRITS + [str(offline_hub)],
        [dst, offline_hub], capsys)
  wd = files["tmp"] / "new-hub-run"
  check(["train", "--config", REPO / CIRR, "--workdir", wd, f"--config.data.root={files['root']}",
         f"--config.model.init={UNKNOWN_HUB_ID}"], 1, HUB_CULPRITS, [wd, offline_hub], capsys)
  out = files["tmp"] / "eval.json"
  check(["eval", "--dataset", "synthetic", "--root", files["root"], "--checkpoint",
         UNKNOWN_HUB_ID, "--json", out], 1, HUB_CULPRITS, [out, offline_hub], capsys)


def test_convert_existing_destination_is_untouched(files, capsys):
  check(["convert", files["hf"], files["workdir"]], 1, [files["workdir"], "--overwrite"],
        [files["workdir"]], capsys)


EVAL_CASES = {
    "batch size 0": (lambda f: ["--checkpoint", f["cirjax"], "--batch-size", "0"], 2,
                     lambda f: ["--batch-size", "'0'"]),
    "garbled params": (lambda f: ["--checkpoint", f["garbled"]], 1,
                       lambda f: [f["garbled"] / "params" / "_METADATA"]),
    "missing checkpoint": (lambda f: ["--checkpoint", f["tmp"] / "nockpt"], 1,
                           lambda f: [f["tmp"] / "nockpt", "training workdir", "LAVIS"]),
    "workdir without export or checkpoint": (lambda f: ["--checkpoint", f["run"]], 1,
                                             lambda f: [f["run"], "without an exported model"]),
    "checkpoint is a text file": (lambda f: ["--checkpoint", f["afile"]], 1,
                                  lambda f: [f["afile"], "not a LAVIS state dict"]),
    "missing dataset root": (lambda f: ["--baseline", "random", "--root", f["tmp"] / "nodata"],
                             1, lambda f: [f["tmp"] / "nodata"]),
    "no root and no tfds-dir": (lambda f: ["--baseline", "random"], 1,
                                lambda f: ["--root", "--tfds-dir"]),
    "--json under a file": (lambda f: ["--baseline", "random", "--json", f["afile"] / "m.json"],
                            2, lambda f: ["--json", f["afile"]]),
    "old --out spelling, under a file": (lambda f: ["--baseline", "random", "--out",
                                                    f["afile"] / "m.json"], 2,
                                         lambda f: ["--json", f["afile"], "--out is deprecated"]),
    "run config.json damaged": (lambda f: ["--checkpoint", f["damaged_run"]], 1,
                                lambda f: [f["damaged_run"] / "config.json"]),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval(case, files, capsys):
  extra, status, culprits = EVAL_CASES[case]
  args = extra(files)
  if "--root" not in args and case != "no root and no tfds-dir":
    args += ["--root", files["root"]]
  out = files["tmp"] / "eval.json"
  if "--out" not in args and "--json" not in args:
    args += ["--json", out]
  check(["eval", "--dataset", "synthetic"] + args, status, culprits(files),
        [out, files["cirjax"], files["garbled"], files["run"]], capsys)


SEARCH_CASES = {
    "k 0": (lambda f: ["--k", "0"], 2, lambda f: ["--k", "'0'"]),
    "missing corpus": (lambda f: ["--corpus", f["tmp"] / "nocorpus"], 1,
                       lambda f: [f["tmp"] / "nocorpus"]),
    "missing reference": (lambda f: ["--reference", f["tmp"] / "noref.png"], 1,
                          lambda f: [f["tmp"] / "noref.png"]),
    "corpus and dataset": (lambda f: ["--dataset", "synthetic"], 2,
                           lambda f: ["--corpus", "--dataset"]),
    "garbage features cache": (lambda f: ["--features-cache", f["badcache"], "--tokenizer",
                                          f["root"], "--reference", f["ref"]], 1,
                               lambda f: [f["badcache"], "--features-cache"]),
}


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_search(case, files, capsys):
  extra, status, culprits = SEARCH_CASES[case]
  base = {"--checkpoint": files["cirjax"], "--corpus": files["root"] / "images" / "val",
          "--reference": files["root"] / "images" / "val" / "missing.png", "--text": "red"}
  args = extra(files)
  for k, v in base.items():
    if k not in args:
      args += [k, v]
  html = files["tmp"] / "search.html"
  check(["search", "--html", html] + args, status, culprits(files), [html, files["cirjax"]],
        capsys)


DATA_CASES = {
    "check: missing root": (lambda f: ["check", "--dataset", "cirr", "--root",
                                       f["tmp"] / "nodata"], 1, lambda f: [f["tmp"] / "nodata"]),
    "check: truncated captions": (lambda f: ["check", "--dataset", "synthetic", "--root",
                                             f["trunc"], "--split", "train"], 1,
                                  lambda f: [f["trunc_file"]]),
    "check: workers 0": (lambda f: ["check", "--dataset", "synthetic", "--root", f["root"],
                                    "--num-workers", "0"], 2, lambda f: ["--num-workers"]),
    "check: old --workers spelling, 0": (lambda f: ["check", "--dataset", "synthetic", "--root",
                                                    f["root"], "--workers", "0"], 2,
                                         lambda f: ["--workers"]),
    "check: InstructCIR image missing": (lambda f: ["check", "--dataset", "instructcir",
                                                    "--root", f["ic_pairs"]], 1,
                                         lambda f: [f["ic_pairs"], "record 2",
                                                    f["ic_pairs"].parent / "img" / "gone.png"]),
    "check: InstructCIR with --split": (lambda f: ["check", "--dataset", "instructcir",
                                                   "--root", f["ic_pairs"], "--split", "val"], 2,
                                        lambda f: ["--split"]),
    "synth: more images than attribute combinations": (
        lambda f: ["synth", "--out", f["tmp"] / "s", "--num-images", "99999"], 2,
        lambda f: ["--num-images=99999", "attribute combinations", "--max-duplicates"]),
    "tfds: --split": (lambda f: ["tfds", "--dataset", "synthetic", "--root", f["root"],
                                 "--data-dir", f["tmp"] / "tfds", "--split", "val"], 2,
                      lambda f: ["--split", "every split"]),
    "tfds: --layout and --skip-missing": (
        lambda f: ["tfds", "--dataset", "cirr", "--root", f["root"], "--data-dir",
                   f["tmp"] / "tfds", "--layout", "flat", "--skip-missing"], 2,
        lambda f: ["--layout", "--skip-missing"]),
    "tfds: missing root": (lambda f: ["tfds", "--dataset", "cirr", "--root", f["tmp"] / "nodata",
                                      "--data-dir", f["tmp"] / "tfds"], 1,
                           lambda f: [f["tmp"] / "nodata"]),
    "synth: non-empty out": (lambda f: ["synth", "--out", f["workdir"]], 1,
                             lambda f: [f["workdir"], "--force"]),
    "synth: out is a file": (lambda f: ["synth", "--out", f["afile"]], 1,
                             lambda f: [f["afile"]]),
    "synth: resolution 0": (lambda f: ["synth", "--out", f["tmp"] / "s", "--resolution", "0"],
                            2, lambda f: ["--resolution"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data(case, files, capsys):
  argv, status, culprits = DATA_CASES[case]
  check(["data"] + argv(files), status, culprits(files),
        [files["workdir"], files["trunc"], files["afile"], files["tmp"] / "s",
         files["tmp"] / "tfds", files["ic_pairs"].parent], capsys)


PARITY_CASES = {
    "a cirjax directory as PATH": (lambda f: [f["cirjax"]], 2, lambda f: ["--converted"]),
    "missing checkpoint": (lambda f: [f["tmp"] / "nockpt"], 2, lambda f: [f["tmp"] / "nockpt"]),
    "config.json holds a list": (lambda f: [f["listcfg"]], 2,
                                 lambda f: [f["listcfg"] / "config.json"]),
    "batch 0": (lambda f: [f["hf"], "--batch-size", "0"], 2, lambda f: ["--batch-size"]),
    "old --batch spelling, 0": (lambda f: [f["hf"], "--batch", "0"], 2, lambda f: ["--batch"]),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity(case, files, capsys):
  argv, status, culprits = PARITY_CASES[case]
  out = files["tmp"] / "parity.json"
  check(["parity", "--json", out] + argv(files), status, culprits(files), [out], capsys)


BENCH_CASES = {
    "unknown suite": (["--suite", "nope"], 2, ["nope"]),
    "missing README": (["--readme-only", "--readme", "/nonexistent/README.md"], 2,
                       ["/nonexistent/README.md"]),
}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench(case, files, capsys):
  argv, status, culprits = BENCH_CASES[case]
  out = files["tmp"] / "bench-out"
  check(["bench", "--out", out] + argv, status, culprits, [out], capsys)


MINE_CASES = {
    "missing checkpoint": (lambda f: ["--checkpoint", f["tmp"] / "nockpt"], 1,
                           lambda f: [f["tmp"] / "nockpt", "training workdir"]),
    "garbled params": (lambda f: ["--checkpoint", f["garbled"]], 1,
                       lambda f: [f["garbled"] / "params" / "_METADATA"]),
    "missing dataset root": (lambda f: ["--root", f["tmp"] / "nodata"], 1,
                             lambda f: [f["tmp"] / "nodata"]),
    "negative consecutive threshold": (lambda f: ["--consecutive-threshold", "-1"], 2,
                                       lambda f: ["--consecutive-threshold", "'-1'"]),
    "k 0": (lambda f: ["--k", "0"], 2, lambda f: ["--k", "'0'"]),
    "--out is a file": (lambda f: ["--out", f["afile"]], 2, lambda f: ["--out", f["afile"]]),
}


@pytest.mark.parametrize("case", list(MINE_CASES))
def test_mine(case, files, capsys):
  extra, status, culprits = MINE_CASES[case]
  base = {"--checkpoint": files["cirjax"], "--dataset": "synthetic", "--root": files["root"],
          "--split": "val", "--out": files["tmp"] / "mine-out"}
  args = extra(files)
  for k, v in base.items():
    if k not in args:
      args += [k, v]
  check(["mine"] + args, status, culprits(files),
        [files["tmp"] / "mine-out", files["cirjax"], files["garbled"], files["afile"]], capsys)


STUDY = "configs/study_qure_synthetic.py:quick"
STUDY_CASES = {
    "missing config": (lambda f: ["--config", f["tmp"] / "nostudy.py"], 2,
                       lambda f: [f["tmp"] / "nostudy.py"]),
    "config file not Python": (lambda f: ["--config", f["badpy"]], 2,
                               lambda f: [f"{f['badpy']}:1", "not valid Python"]),
    "unknown arm": (lambda f: ["--arms", "nope"], 2, lambda f: ["--arms nope"]),
    "unknown density": (lambda f: ["--densities", "nope"], 2, lambda f: ["--densities nope"]),
    "non-empty --out without --overwrite": (lambda f: ["--out", f["workdir"]], 2,
                                            lambda f: [f["workdir"], "--overwrite"]),
    "--out is a file": (lambda f: ["--out", f["afile"]], 2, lambda f: ["--out", f["afile"]]),
}


@pytest.mark.parametrize("case", list(STUDY_CASES))
def test_study(case, files, capsys):
  extra, status, culprits = STUDY_CASES[case]
  wd = files["tmp"] / "study-wd"
  args = extra(files)
  if "--config" not in args:
    args += ["--config", REPO / STUDY]
  check(["study", "--workdir", wd] + args, status, culprits(files),
        [wd, files["workdir"], files["afile"]], capsys)
  assert not wd.exists()


# ----------------------------------------------------------------------------- entry point


def _run_cli(args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.update(env_extra or {})
  env.pop("CIRJAX_DEBUG", None) if not env_extra else None
  return subprocess.run([sys.executable, "-m", "cirjax"] + [str(a) for a in args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_entry_point_clean_error_and_debug_traceback(files):
  argv = ["data", "check", "--dataset", "synthetic", "--root", files["trunc"], "--split",
          "train"]
  r = _run_cli(argv)
  assert r.returncode == 1, r.stderr
  assert "Traceback" not in r.stderr and str(files["trunc_file"]) in r.stderr
  assert r.stderr.count("error:") == 1
  r = _run_cli(argv, {"CIRJAX_DEBUG": "1"})
  assert r.returncode == 1 and "Traceback" in r.stderr and str(files["trunc_file"]) in r.stderr


def test_debug_flag_shows_the_traceback(files, capsys):
  argv = ["--debug", "eval", "--dataset", "synthetic", "--root", files["root"], "--checkpoint",
          files["garbled"]]
  assert cli.main([str(a) for a in argv]) == 1
  err = capsys.readouterr().err
  assert "Traceback" in err and "_METADATA" in err


def test_a_bug_keeps_its_traceback(files, monkeypatch):
  """Only expected errors are shortened: anything else (a bug) propagates unchanged."""
  from cirjax.commands import data as data_cmd

  def broken(args):
    raise ZeroDivisionError("a bug")

  monkeypatch.setattr(data_cmd, "run", broken)
  with pytest.raises(ZeroDivisionError, match="a bug"):
    cli.main(["data", "check", "--dataset", "synthetic", "--root", str(files["root"])])


# A command whose own code raises a plain ValueError (a bug, not an error cirjax raises on
# purpose): module, the function it calls early, and its argv.
BUG_SITES = {
    "mine": ("cirjax.commands.mine", "read_split",
             lambda f: ["--checkpoint", f["cirjax"], "--dataset", "synthetic", "--root", f["root"],
                        "--out", f["tmp"] / "bug-out"]),
    "study": ("cirjax.study", "run_study",
              lambda f: ["--config", REPO / STUDY, "--workdir", f["tmp"] / "bug-wd"]),
    "eval": ("cirjax.commands.eval", "_splits",
             lambda f: ["--dataset", "synthetic", "--root", f["root"], "--baseline", "random"]),
    "search": ("cirjax.commands.search", "read_split",
               lambda f: ["--checkpoint", f["cirjax"], "--dataset", "synthetic", "--root",
                          f["root"], "--reference", f["ref"], "--text", "red"]),
    "convert": ("cirjax.commands.convert", "to_cirjax",
                lambda f: [f["hf"], f["tmp"] / "bug-convert"]),
}


@pytest.mark.parametrize("command", list(BUG_SITES))
def test_a_plain_value_error_is_a_bug_with_its_traceback(command, files, monkeypatch, capsys):
  """No command turns a ValueError into a one-line message: only CirjaxError (and the
  system's errors about a named file) are; a bug keeps its traceback, --debug or not."""
  import importlib  # pylint: disable=g-import-not-at-top
  modname, attr, argv = BUG_SITES[command]
  mod = importlib.import_module(modname)

  def broken(*args, **kwargs):
    raise ValueError("a bug, not bad input")

  monkeypatch.setattr(mod, attr, broken)
  for debug in ([], ["--debug"]):
    with pytest.raises(ValueError, match="a bug, not bad input"):
      cli.main(debug + [command] + [str(a) for a in argv(files)])
    assert "error:" not in capsys.readouterr().err


def test_platform_without_its_backend_is_one_line(files):
  """`--platform gpu` on a CPU-only JAX: a usage error naming the flag, no traceback (a
  subprocess: the forced platform is process-wide)."""
  r = _run_cli(["train", "--config", REPO / SYNTH, "--workdir", files["tmp"] / "gpu-run",
                "--platform", "gpu", f"--config.data.root={files['root']}"],
               {"JAX_PLATFORMS": ""})
  if r.returncode == 0:
    pytest.skip("this JAX has a GPU backend")
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and lines[0].startswith("cirjax train: error: --platform gpu"), r.stderr
  assert "pip install -e '.[cuda]'" in lines[0]
  assert not (files["tmp"] / "gpu-run").exists()


def test_describe_names_the_path_of_os_errors():
  from cirjax import errors
  msg, status = errors.describe(PermissionError(13, "Permission denied", "/x/y.json"))
  assert msg == "/x/y.json: permission denied" and status == 1
  assert errors.describe(errors.UsageError("bad --k"))[1] == 2
  assert errors.describe(RuntimeError("bug")) is None
