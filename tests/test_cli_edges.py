"""The command line's rough edges, each with its case: `--version`, `--help` without jax,
the renamed options' old spellings, `data check`'s progress and InstructCIR data, what the
README's commands write, and `train`'s exit status 3 on a non-finite loss. (Bad input of
every command: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cirjax
from cirjax import cli
from cirjax.commands import COMMANDS, flags

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"cirjax {cirjax.__version__}"
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  assert cfg["metadata"]["version"] == cirjax.__version__


def test_help_lists_every_command_without_importing_jax():
  code = ("import sys\nfrom cirjax import cli\ntry:\n  cli.main(['--help'])\nexcept SystemExit:\n"
          "  pass\nprint('IMPORTED', sorted(m for m in ('jax', 'flax', 'numpy', 'torch', "
          "'cirjax.commands.train') if m in sys.modules))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
  assert r.returncode == 0, r.stderr
  assert "IMPORTED []" in r.stdout, r.stdout
  for name, modname in COMMANDS.items():
    help_line = cli.command_help(importlib.util.find_spec(modname))
    assert help_line and help_line.split()[0] in r.stdout, (name, help_line)
    assert re.search(rf"^\s+{name}\s", r.stdout, re.M), name


# command argv prefix, the value each renamed option is given, and the parsed dest
_BASE = {"train": ["train", "--config", "c.py", "--workdir", "w"],
         "data check": ["data", "check", "--dataset", "synthetic", "--root", "r"],
         "parity": ["parity", "p"],
         "eval": ["eval", "--dataset", "synthetic", "--baseline", "random"]}
_DEST = {"--num-processes": ("num_processes", 2), "--process-id": ("process_id", 2),
         "--cpu-devices": ("cpu_devices", 2), "--num-workers": ("num_workers", 2),
         "--batch-size": ("batch_size", 2), "--max-length": ("max_length", 2),
         "--json": ("out", "m.json")}


@pytest.mark.parametrize("command,old,new", [(c, o, n) for c, names in flags.RENAMED.items()
                                             for o, n in names.items()])
def test_old_spellings_work_with_a_deprecation_line(command, old, new, capsys):
  dest, value = _DEST[new]
  parser = cli.build_parser(command.split()[0])
  ns = parser.parse_args(_BASE[command] + [old, str(value)])
  assert getattr(ns, dest) == value
  err = capsys.readouterr().err
  assert f"cirjax {command}: warning: {old} is deprecated; use {new}" in err, err
  ns = parser.parse_args(_BASE[command] + [new, str(value)])
  assert getattr(ns, dest) == value and "deprecated" not in capsys.readouterr().err
  assert old not in parser.format_help()  # hidden: --help shows the new spelling only


def test_data_check_progress_reaches_the_total(synth_root, capsys):
  """The bar ends at N/N (it stopped one short, never closed, when zipped with the names)."""
  assert cli.main(["data", "check", "--dataset", "synthetic", "--root", str(synth_root),
                   "--num-workers", "2"]) == 0
  out, err = capsys.readouterr()
  n = json.loads(out)["known_images"]
  final = err.replace("\r", "\n").strip().splitlines()[-1]
  assert f"{n}/{n}" in final, final


def test_data_check_reads_instructcir_data(synth_root, tmp_path, capsys):
  img = sorted((synth_root / "images" / "val").iterdir())[:3]
  (tmp_path / "images").mkdir()
  for i, p in enumerate(img):
    shutil.copy(p, tmp_path / "images" / f"{i}.png")
  (tmp_path / "pairs.jsonl").write_text("".join(
      json.dumps({"image": f"{i}.png", "caption": "a red cube"}) + "\n" for i in range(3)))
  (tmp_path / "triplets.jsonl").write_text("".join(json.dumps(
      {"image": f"{i % 3}.png", "instruction": "make it blue", "modified_caption": "a blue cube",
       "original_caption": "a red cube"}) + "\n" for i in range(4)))
  (tmp_path / "images" / "2.png").write_bytes(b"not a png")
  common = ["data", "check", "--dataset", "instructcir", "--image-root", str(tmp_path / "images")]
  assert cli.main(common + ["--root", str(tmp_path / "pairs.jsonl")]) == 1
  assert "2.png" in capsys.readouterr().err
  assert cli.main(common + ["--root", str(tmp_path / "pairs.jsonl"), "--skip-missing"]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats["kind"] == "caption pairs (stage 1)" and stats["records"] == 2
  assert stats["skipped"] == {"missing_images": 0, "undecodable_images": 1}
  assert cli.main(common + ["--root", str(tmp_path / "triplets.jsonl"), "--no-decode"]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats["kind"] == "triplets (stage 2)" and stats["records"] == 4 and stats["images"] == 3


def _readme_commands() -> list[str]:
  text = (REPO / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  return [line.strip() for b in blocks for line in b.splitlines()
          if line.strip().startswith("cirjax ")]


def test_readme_runs_write_under_the_ignored_runs_dir():
  """The README's train and study commands write under runs/ (ignored by git), never over
  the committed results in benchmarks/results/."""
  ignored = (REPO / ".gitignore").read_text().split()
  assert "/runs/" in ignored
  runs = [c for c in _readme_commands() if c.split()[1] in ("train", "study")]
  assert any(c.split()[1] == "study" for c in runs) and any(c.split()[1] == "train" for c in runs)
  for c in runs:
    workdir = c.split("--workdir")[1].split()[0]
    assert workdir.startswith("runs/"), c
    assert "benchmarks/results" not in c and "--overwrite" not in c, c


def test_train_stops_with_exit_3_on_a_non_finite_loss(synth_root, tmp_path, capsys):
  wd = tmp_path / "nan"
  status = cli.main(["train", "--config", str(REPO / "configs" / "synthetic.py") + ":tiny",
                     "--workdir", str(wd), f"--config.data.root={synth_root}",
                     "--config.train.lr=1e30", "--config.train.epochs=1",
                     "--config.model.qformer.hidden_dropout_prob=0",
                     "--config.model.qformer.attention_probs_dropout_prob=0"])
  err = capsys.readouterr().err
  assert status == 3, err
  line = next(x for x in err.splitlines() if "error:" in x)
  assert line.startswith("cirjax train: error:") and "non-finite" in line, err
  assert "nonfinite_loss" in (wd / "metrics.jsonl").read_text()
