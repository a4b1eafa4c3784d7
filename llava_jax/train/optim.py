"""Optimizer: AdamW + warmup-then-cosine schedule + global-norm clipping, as the reference's HF Trainer.

What the reference (LLaVA's `train.py` on HF Trainer) does, and what we match:
- AdamW with β = (0.9, 0.999), eps 1e-8, decoupled weight decay `p ← p − lr·wd·p` (torch.optim.AdamW and
  optax.adamw compute the same update). Recipes use weight decay 0.
- Weight decay applies to every trainable parameter except biases and normalization weights. HF Trainer's
  `get_decay_parameter_names` exempts `nn.LayerNorm` modules and names matching 'bias', 'layernorm', 'rmsnorm',
  'norm' or '_norm'; in our tree that is: leaves named `bias`, and every leaf under a module whose name contains
  'norm' (CLIP `pre_layrnorm`, `layer_norm1/2`, `post_layernorm`; LLaMA `input_layernorm`,
  `post_attention_layernorm`, `norm`). Embedding tables ARE decayed, as in HF.
- Schedule: `get_cosine_schedule_with_warmup` — linear warmup from 0 over
  `ceil(warmup_ratio × total_steps)` steps (HF `TrainingArguments.get_warmup_steps`), then cosine to 0 at
  `total_steps`. Update i (0-based) uses lr(i); in particular the very first update uses lr(0) = 0 when there is
  warmup, exactly as torch's LambdaLR does.
- Gradient clipping to global norm `max_grad_norm` (HF default 1.0) before AdamW. torch's `clip_grad_norm_`
  scales by max/(norm + 1e-6), optax by max/norm: a relative difference below 1e-6/norm.
- LoRA fine-tuning (`finetune_lora.sh`): `mm_projector_lr` puts the projector in its own parameter group with
  its own peak rate (2e-5 against the adapters' 2e-4), same schedule shape (`make_optimizer`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def decays(path) -> bool:
  """HF Trainer's rule for one param path (tuple or '/'-joined): False for biases and normalization weights."""
  parts = path.split("/") if isinstance(path, str) else [str(p) for p in path]
  if parts[-1] == "bias":
    return False
  return not any("norm" in p.lower() for p in parts[:-1])


def weight_decay_mask(params):
  """Pytree of bools with `params`' structure: True where weight decay applies (see `decays`)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: decays(p) for p in flat})


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
  """HF `get_warmup_steps`: ceil(total_steps × ratio) for a ratio in [0, 1)."""
  if not 0.0 <= warmup_ratio < 1.0:
    raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
  return int(math.ceil(total_steps * warmup_ratio))


def make_schedule(learning_rate: float, total_steps: int, warmup_ratio: float = 0.03) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over ceil(ratio × total) steps, then cosine to 0 at `total_steps`."""
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive (set train.num_steps or num_epochs)")
  warm = warmup_steps(total_steps, warmup_ratio)
  if warm == 0:
    return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.0)
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warm, total_steps, end_value=0.0)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation plus the learning-rate schedule it uses (for the `learning_rate` metric).

  `tx.init(trainable_params)` / `tx.update(grads, state, params)` as usual; `schedule(step)` is the learning rate
  of update number `step` (None when the transformation has no schedule to report).
  """
  tx: optax.GradientTransformation
  schedule: Optional[Callable[[Any], Any]] = None

  def init(self, params):
    return self.tx.init(params)

  def update(self, grads, state, params):
    return self.tx.update(grads, state, params)

  def learning_rate(self, step):
    return jnp.asarray(jnp.nan if self.schedule is None else self.schedule(step), jnp.float32)


PROJECTOR = r"multi_modal_projector/.*"


def projector_labels(params, pattern: str = PROJECTOR):
  """Pytree of 'projector' / 'default' labels with `params`' structure ('/'-joined path full-matches
  `pattern` → 'projector'): the param groups of `optax.multi_transform`."""
  flat = traverse_util.flatten_dict(params)
  rx = re.compile(pattern)
  return traverse_util.unflatten_dict({p: "projector" if rx.fullmatch("/".join(map(str, p))) else "default"
                                       for p in flat})


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_ratio: float = 0.03,
                   weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, projector_learning_rate: Optional[float] = None) -> Optimizer:
  """clip_by_global_norm(max_grad_norm) → AdamW(schedule, b1, b2, eps, weight_decay masked per HF).

  `max_grad_norm` None or ≤ 0 disables clipping (HF does the same for 0).
  projector_learning_rate: the reference's `mm_projector_lr` — the projector's parameters (`PROJECTOR` paths)
  form their own AdamW group whose schedule has the same warmup and cosine shape but peaks at this rate (HF
  Trainer's LambdaLR scales each group's base rate by one factor); clipping stays global over all parameters.
  None or ≤ 0: one group at `learning_rate`. The `learning_rate` metric reports the main group's rate.
  """
  schedule = make_schedule(learning_rate, total_steps, warmup_ratio)
  adamw = lambda sched: optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
  if projector_learning_rate is not None and projector_learning_rate > 0:
    projector_schedule = make_schedule(projector_learning_rate, total_steps, warmup_ratio)
    opt = optax.multi_transform({"default": adamw(schedule), "projector": adamw(projector_schedule)},
                                projector_labels)
  else:
    opt = adamw(schedule)
  parts = [opt] if not max_grad_norm or max_grad_norm <= 0 else [optax.clip_by_global_norm(max_grad_norm), opt]
  return Optimizer(optax.chain(*parts), schedule)


def optimizer_from_config(train, total_steps: int) -> Optimizer:
  """From the config's `train` section (recipes.train_section fields; `mm_projector_lr` 0 = one rate)."""
  return make_optimizer(learning_rate=float(train.learning_rate), total_steps=int(total_steps),
                        warmup_ratio=float(train.warmup_ratio), weight_decay=float(train.weight_decay),
                        max_grad_norm=float(train.max_grad_norm), b1=float(train.b1), b2=float(train.b2),
                        eps=float(train.eps), projector_learning_rate=float(train.mm_projector_lr))


def global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares of all leaves, in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
