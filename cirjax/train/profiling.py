"""`config.profile_steps`: a `jax.profiler` trace of a range of training steps.

`profile_steps="10,15"` traces steps 10 to 15 (the 10th to the 15th step this run executes
counting from the start of training, so a resumed run past step 15 traces nothing) on process
0 into `<workdir>/profile/`, in the layout TensorBoard's profile plugin reads
(`plugins/profile/<time>/<host>.xplane.pb`): `tensorboard --logdir <workdir>/profile`
(`pip install tensorboard tensorboard-plugin-profile`), or open the `.xplane.pb` in XProf /
Perfetto. A single number `"10"` traces that step. Empty (the default): no trace.
"""

from __future__ import annotations

import os

import jax

from cirjax.errors import UsageError

PROFILE_DIR = "profile"


def parse_steps(text: str) -> tuple[int, int] | None:
  """`"a,b"` -> (a, b); `"a"` -> (a, a); `""` -> None. A `UsageError` names a bad value."""
  text = str(text or "").strip()
  if not text:
    return None
  try:
    parts = [int(p) for p in text.replace("-", ",").split(",") if p.strip()]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
    raise UsageError(f"config.profile_steps={text!r}: expected FIRST,LAST step numbers with "
                     "1 <= FIRST <= LAST (e.g. \"10,15\"), or empty")
  return parts[0], parts[1]


class StepProfiler:
  """Starts the trace before step `first` and stops it after step `last`."""

  def __init__(self, steps: tuple[int, int] | None, workdir: str):
    self.steps = steps if jax.process_index() == 0 else None
    self.dir = os.path.join(workdir, PROFILE_DIR)
    self.active = False

  def before_step(self, step: int) -> None:
    """Called with the number of the step about to run (steps done + 1)."""
    if self.steps and step == self.steps[0] and not self.active:
      os.makedirs(self.dir, exist_ok=True)
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(state)  # the traced steps' device work inside the trace
      self.stop()

  def on_step(self, step: int, state) -> None:
    """The trainer's hook after step `step` (steps done)."""
    self.after_step(step, state)
    self.before_step(step + 1)

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
