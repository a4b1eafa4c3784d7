"""The training progress bar in a notebook: one display output updated in place (what the saved notebook and
GitHub show is the final bar), not one carriage-return copy per refresh on the kernel's stderr."""
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

STEPS = 300
CELL = f"""
import time
import jax.numpy as jnp
from llava_jax.train import progress
progress.NOTEBOOK_REFRESH_S = 0.01  # refresh often: many updates must still leave one output
bar = progress.StepProgress(0, {STEPS}, print)
bar.before_first()
for step in range(1, {STEPS} + 1):
  bar.dispatched(step, {{"loss": jnp.float32(step)}})
  if step % 50 == 0:
    bar.set_postfix(loss=f"{{step / 100:.2f}}")
    time.sleep(0.02)
bar.close()
"""


def test_notebook_progress_is_one_updating_output(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = nb.cells[0].outputs
  displays = [o for o in outputs if o.output_type == "display_data"]
  streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert len(displays) == 1, outputs
  final = displays[0].data["text/plain"]
  assert final.startswith("train: 100%") and f"{STEPS}/{STEPS}" in final and "loss=3.00" in final, final
  assert outputs[0] is displays[0]  # shown at 0/300 before the first step, then updated in place
  assert "\r" not in streams and "train:" not in streams  # nothing of the bar in the text streams
  assert "compiling the train step" in streams and "first step compiled" in streams  # the user-facing lines


def test_outside_a_kernel_the_bar_is_tqdm_on_stderr(capsys):
  import jax.numpy as jnp

  from llava_jax.train import progress
  assert progress.notebook_display_line() is None
  bar = progress.StepProgress(0, 3, print)
  for step in (1, 2, 3):
    bar.dispatched(step, jnp.float32(step))
  bar.close()
  assert "3/3" in capsys.readouterr().err
