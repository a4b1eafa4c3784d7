"""One process of tests/train/test_multihost.py: `jax.distributed` on 127.0.0.1 with simulated CPU devices.

    python tests/train/multihost_worker.py --process_id=I --num_processes=P --port=N --devices=D \
        --workdir=W --tokenizer_root=R --steps=S --out=DIR [--buckets=L1,L2,...]

Trains configs/tiny.py (no warmup; data.bucket_lengths from --buckets) with a schedule of S steps using
loop.train on a global (P·D, 1, 1) mesh — each process loads only its own rows (the pipeline shards by
jax.process_index) — until the test sends SIGTERM (jax's preemption sync manager makes every process stop and
save at the same step), then writes, for the test
to compare across processes:
  DIR/result.process<I>.json     {"steps": last step, "preempted": bool}
  DIR/metrics.process<I>.jsonl   this process's view of every logged step's metrics (replicated scalars)
  DIR/params.process<I>.npz      the final full parameter tree gathered to this host ('/'-joined paths)
  DIR/probe.process<I>.json      the input-iterator state this process gets back from a checkpoint in which each
                                 process saved a different one ({"host": I})
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
  p = argparse.ArgumentParser()
  for name in ("process_id", "num_processes", "port", "devices", "steps"):
    p.add_argument(f"--{name}", type=int, required=True)
  for name in ("workdir", "tokenizer_root", "out"):
    p.add_argument(f"--{name}", required=True)
  p.add_argument("--buckets", default="", help="comma-separated data.bucket_lengths (default: the config's)")
  return p.parse_args(argv)


def main(argv):
  args = parse_args(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from flax import traverse_util
  from etils import epath
  from jax.experimental import multihost_utils

  jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                             coordinator_bind_address=f"127.0.0.1:{args.port}", initialization_timeout=120,
                             heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
  assert jax.local_device_count() == args.devices and jax.device_count() == args.devices * args.num_processes

  from llava_jax.train import checkpointing, loop, metrics as metrics_lib

  class PerProcessWriter(metrics_lib.MetricsWriter):
    """Every process records what it sees (the loop's writer records on process 0 only)."""

    def __init__(self, workdir, enabled=None):
      super().__init__(args.out, enabled=True)
      self.path = epath.Path(args.out) / f"metrics.process{args.process_id}.jsonl"

  loop.metrics_lib.MetricsWriter = PerProcessWriter

  from llava_jax import config_files
  config = config_files.load(os.path.join(REPO, "configs", "tiny.py"))
  config.mesh = (jax.device_count(), 1, 1)
  config.train.num_steps = args.steps
  config.train.warmup_ratio = 0.0
  config.train.checkpoint_every = 2
  config.eval.synthetic_samples = 0
  if args.buckets:
    config.data.bucket_lengths = tuple(int(n) for n in args.buckets.split(","))
  result = loop.train(config, args.workdir, tokenizer_workdir=args.tokenizer_root)
  with open(os.path.join(args.out, f"result.process{args.process_id}.json"), "w") as f:
    json.dump({"steps": int(result.steps), "preempted": bool(result.preempted)}, f)

  full = multihost_utils.process_allgather(result.state.full_params(), tiled=True)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(full).items()}
  np.savez(os.path.join(args.out, f"params.process{args.process_id}.npz"), **flat)

  probe = checkpointing.Checkpointer(os.path.join(args.out, "probe"))
  probe.save(1, result.state, data_state={"host": args.process_id}, force=True)
  probe.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state)
  _, data_state, _ = probe.restore(1, abstract)
  probe.close()
  with open(os.path.join(args.out, f"probe.process{args.process_id}.json"), "w") as f:
    json.dump(data_state, f)
  multihost_utils.sync_global_devices("multihost_worker done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
