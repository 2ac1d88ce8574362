"""The grain input pipeline over a `cirjax data tfds` build: it feeds the examples of the
prefetch pipeline in the same order, splits every global batch disjointly over the hosts,
resumes at the exact example from its saved iterator state, and a QuRe run killed mid-epoch
and resumed through it equals an uninterrupted run bit for bit."""

from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from cirjax.data import grain_pipeline, synth, text, tfds_builders, training_splits
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.records import DataError
from cirjax.errors import UsageError
from cirjax.train import config_utils, sharding as shd

REPO = Path(__file__).resolve().parents[1]
B, STEPS, EPOCHS, SEED = 16, 4, 2, 0  # the tiny config's batch, 64 queries, 2 epochs


@pytest.fixture(scope="module")
def tfds_dir(synth_root, tmp_path_factory):
  out = tmp_path_factory.mktemp("tfds")
  tfds_builders.build("synthetic", synth_root, out)
  return out


def _feed(tfds_dir, synth_root, shard=(0, 1), workers=0, tok=None):
  split = synth.read_synthetic(synth_root, "train")
  names = {n: i for i, n in enumerate(split.images)}
  tok = tok or load_tokenizer(synth_root / "vocab.txt", "blip2")
  return grain_pipeline.GrainFeed(
      str(tfds_dir), "synthetic", ["train"], tokenizer=tok, max_length=16, image_index=names,
      seed=SEED, epochs=EPOCHS, steps_per_epoch=STEPS, global_batch=B, workers=workers,
      shard_options=grain.sharding.ShardOptions(*shard)), split, names, tok


def test_feed_is_the_prefetch_order_and_reads_the_records(tfds_dir, synth_root):
  feed, split, names, tok = _feed(tfds_dir, synth_root)
  for step in range(EPOCHS * STEPS):
    epoch, index = divmod(step, STEPS)
    want = training_splits.epoch_rows(SEED, epoch, len(split.queries), STEPS, B)[
        index * B:(index + 1) * B]
    got = feed.next(step)
    np.testing.assert_array_equal(got["row"], want)
    qs = [split.queries[int(r)] for r in want]
    ids, mask = text.tokenize(tok, [q.text for q in qs], 16)
    np.testing.assert_array_equal(got["input_ids"], ids)
    np.testing.assert_array_equal(got["attention_mask"], mask)
    np.testing.assert_array_equal(got["reference"], [names[q.reference] for q in qs])
    np.testing.assert_array_equal(got["target"], [names[q.target] for q in qs])
  feed.close()


def test_two_hosts_split_every_batch_disjointly(tfds_dir, synth_root):
  one, *_ = _feed(tfds_dir, synth_root)
  hosts = [_feed(tfds_dir, synth_root, shard=(i, 2))[0] for i in range(2)]
  seen = []
  for step in range(STEPS):
    whole = one.next(step)["row"]
    parts = [h.next(step)["row"] for h in hosts]
    assert all(len(p) == B // 2 for p in parts)
    assert not set(parts[0]) & set(parts[1])
    # Host i holds the i-th contiguous half of the global batch, as the trainer places rows.
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    seen += [r for p in parts for r in p]
  assert sorted(seen) == sorted(training_splits.epoch_rows(SEED, 0, 64, STEPS, B))
  with pytest.raises(DataError, match="not divisible"):
    _feed(tfds_dir, synth_root, shard=(0, 3))


def test_saved_state_resumes_at_the_exact_example(tfds_dir, synth_root):
  feed, _, _, tok = _feed(tfds_dir, synth_root)
  for step in range(3):
    feed.next(step)
  state = feed.state()
  feed.start(3)  # reads step 3 ahead (an epoch's start): not taken, not in the state
  assert feed.state() == state
  rest = [feed.next(s)["row"] for s in range(3, EPOCHS * STEPS)]
  again, *_ = _feed(tfds_dir, synth_root, tok=tok)
  again.load_state(state)
  assert again.state() == state  # a checkpoint taken before the first batch keeps it
  got = [again.next(s)["row"] for s in range(3, EPOCHS * STEPS)]
  for a, b in zip(rest, got):
    np.testing.assert_array_equal(a, b)
  # The state is JSON (it goes into the checkpoint's host state).
  import json
  assert json.loads(json.dumps(state)) == state
  # Asked for another step than the next one, the feed starts over there.
  np.testing.assert_array_equal(again.next(1)["row"],
                                training_splits.epoch_rows(SEED, 0, 64, STEPS, B)[B:2 * B])
  # A state of another shard is refused.
  other, *_ = _feed(tfds_dir, synth_root, shard=(1, 2), tok=tok)
  with pytest.raises(DataError, match="shard"):
    other.load_state(state)


def test_several_training_splits_are_one_row_space(tmp_path):
  """FashionIQ's categories: rows run split after split, as the QuRe task numbers them."""
  import sys
  sys.path.insert(0, str(Path(__file__).parent))
  from test_train_qure import _fashioniq  # the tiny FashionIQ in its published layout
  root, vocab = tmp_path / "fiq", tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "red"]))
  _fashioniq(root, vocab)
  tfds_builders.build("fashioniq", root, tmp_path / "tfds")
  import ml_collections
  dc = ml_collections.ConfigDict({"dataset": "fashioniq", "pipeline": "grain",
                                  "tfds_dir": str(tmp_path / "tfds"), "train_split": "train",
                                  "eval_split": "val", "categories": ("dress", "shirt")})
  train, evals, source = training_splits.read_training_data(dc)
  assert [len(s.queries) for s in train] == [24, 24] and len(evals) == 2
  queries = [q for s in train for q in s.queries]
  names = {n: i for i, n in enumerate(dict.fromkeys(
      n for s in train + evals for n in s.images))}
  assert np.asarray(source(queries[30].target)).shape[-1] == 3
  feed = grain_pipeline.GrainFeed(
      str(tmp_path / "tfds"), "fashioniq", ["dress_train", "shirt_train"],
      tokenizer=load_tokenizer(vocab, "blip2"), max_length=8, image_index=names, seed=3,
      epochs=1, steps_per_epoch=6, global_batch=8)
  for step in range(6):
    got = feed.next(step)
    want = training_splits.epoch_rows(3, 0, 48, 6, 8)[step * 8:(step + 1) * 8]
    np.testing.assert_array_equal(got["row"], want)
    np.testing.assert_array_equal(got["target"], [names[queries[r].target] for r in want])


def test_pipeline_config_is_checked():
  import ml_collections
  dc = ml_collections.ConfigDict({"pipeline": "grain", "tfds_dir": ""})
  with pytest.raises(UsageError, match="config.data.tfds_dir"):
    training_splits.pipeline(dc)
  dc.pipeline = "tf.data"
  with pytest.raises(UsageError, match="config.data.pipeline='tf.data'"):
    training_splits.pipeline(dc)


def _run(cfg, workdir):
  from cirjax.train.trainer import Trainer
  mesh = shd.make_mesh(tuple(tuple(a) for a in cfg.mesh), jax.devices())
  t = Trainer(cfg, str(workdir), mesh=mesh)
  return t.run(), t


@pytest.mark.slow
def test_grain_training_killed_mid_epoch_resumes_bit_for_bit(tfds_dir, synth_root, tmp_path,
                                                               monkeypatch):
  """Prefetch pipeline uninterrupted == grain pipeline (2 worker processes) stopped after 3
  steps (mid-epoch 0) and resumed: the same examples in the same order, the same losses
  and parameters, bit for bit."""
  base = [f"data.root={synth_root}", f"data.tokenizer={synth_root / 'vocab.txt'}",
          "eval_every_epochs=0", "export=False", "checkpoint.every_steps=1"]
  spec = str(REPO / "configs/synthetic.py") + ":tiny"
  full, _ = _run(config_utils.load_config(spec, base), tmp_path / "prefetch")
  grain_cfg = config_utils.load_config(spec, base + [
      "data.pipeline=grain", f"data.tfds_dir={tfds_dir}", "data.grain_workers=2"])
  monkeypatch.setenv("CIRJAX_STOP_AFTER_STEP", "3")
  cut, t_cut = _run(grain_cfg, tmp_path / "grain")
  assert cut["status"] == "stopped" and len(cut["losses"]) == 3
  monkeypatch.delenv("CIRJAX_STOP_AFTER_STEP")
  rest, t_rest = _run(grain_cfg, tmp_path / "grain")
  assert rest["status"] == "done" and t_rest.resumed_from == 3
  cut_fed, rest_fed = t_cut.task.train_queries.feed.yielded, t_rest.task.train_queries.feed.yielded
  fed = [s for s, _ in cut_fed if s < 3] + [s for s, _ in rest_fed]
  assert fed == list(range(EPOCHS * STEPS))
  rows = [r for s, r in cut_fed if s < 3] + [r for _, r in rest_fed]
  want = [training_splits.epoch_rows(SEED, e, 64, STEPS, B)[i * B:(i + 1) * B]
          for e in range(EPOCHS) for i in range(STEPS)]
  for a, b in zip(rows, want):
    np.testing.assert_array_equal(a, b)
  assert cut["losses"] + rest["losses"] == full["losses"]
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(full["state"].params), jax.device_get(rest["state"].params))


@pytest.mark.slow
def test_two_processes_read_their_halves_through_grain(tfds_dir, synth_root, tmp_path):
  """2 processes x 2 CPU devices, each reading its half of every batch from the ArrayRecords
  (ShardByJaxProcess, checked row by row against the batch's rows), train like 1 process
  with 4 devices on the prefetch pipeline."""
  import json
  import os
  import sys
  sys.path.insert(0, str(REPO / "launch"))
  import multiprocess  # pylint: disable=import-outside-toplevel
  args = ["--config", str(REPO / "configs/synthetic.py") + ":tiny",
          f"--config.data.root={synth_root}", f"--config.data.tokenizer={synth_root / 'vocab.txt'}",
          "--config.eval_every_epochs=0", "--config.export=False",
          "--config.mesh=(('data', 4), ('fsdp', 1))",
          "--config.warm_start.overrides=()"]   # the recipe itself, from random weights
  one = _run(config_utils.load_config(args[1], [a[len("--config."):] for a in args[2:]]),
             tmp_path / "one")[0]
  status = multiprocess.launch(
      args + ["--config.data.pipeline=grain", f"--config.data.tfds_dir={tfds_dir}",
              "--config.data.grain_workers=1", "--workdir", str(tmp_path / "two")],
      num_processes=2, devices_per_process=2, timeout=500, env={"CIRJAX_CPU_DEVICES": ""})
  assert status == 0
  recs = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  two = [r["loss"] for r in recs if r["kind"] == "train"]
  np.testing.assert_allclose(two, one["losses"], rtol=1e-5)
  assert os.path.isfile(tmp_path / "two" / "final_metrics.json")
