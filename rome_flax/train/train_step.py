"""The jitted train step `(state, batch) -> (state, metrics)` of every method, and the eval step.

GR as gradient projection (method.md) runs ONE forward pass (`jax.vjp`) and pulls two cotangents
back through it: d(final term)/d(logits) and d(highway terms)/d(logits). The two parameter
gradients are projected over the encoder weight matrices of layers 1..L-1 and summed, all inside
one XLA program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.train import methods
from rome_flax.train.losses import LossTerms
from rome_flax.train.methods import LossConfig, loss_terms

_TINY = 1e-30


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar: optimizer steps taken over the whole run (all stages)
  params: Any
  opt_state: Any
  rng: jax.Array         # uint32[2] base key; the dropout key of step s is fold_in(rng, s)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-5
  warmup_steps: int = 0
  total_steps: int = 1000      # steps of this stage (the linear decay reaches 0 there)
  weight_decay: float = 0.0
  adam_eps: float = 1e-8
  clip_norm: float = 1.0
  encoder_lr_scale: float = 1.0   # the encoder's learning rate / the heads' (the seq-lab reference: 0.1)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then linear decay to 0 at total_steps."""
  warmup = min(cfg.warmup_steps, cfg.total_steps)
  decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def weight_decay_mask(params) -> Any:
  """Decay weight matrices and embeddings; not biases or LayerNorm parameters."""
  def decays(path, _):
    name = path[-1].key
    in_layer_norm = any(getattr(k, "key", "") in ("ln", "attention_ln", "output_ln") for k in path)
    return name in ("kernel", "embedding") and not in_layer_norm
  return jax.tree_util.tree_map_with_path(decays, params)


def _train_layout_like(params):
  """The per-layer layout's tree of shapes (no copies): what masks over the train state are built on."""
  return jax.eval_shape(model_lib.unstack_layers, params)


def trainable_mask(params, cfg: ModelConfig, method: str, stage: int = 1):
  """True for the leaves (per-layer layout) that `stage` of `method` trains, as `methods.py` declares."""
  plan = methods.get_method(method).stage(stage).plan(cfg.num_layers)
  params = _train_layout_like(params)
  encoder = lambda tree: jax.tree.map(lambda _: plan.train_encoder, tree)
  return {"embeddings": encoder(params["embeddings"]), "layers": encoder(params["layers"]),
          "exits": tuple(jax.tree.map(lambda _, i=i: i in plan.exits, head) for i, head in enumerate(params["exits"]))}


def make_optimizer(cfg: OptimConfig, trainable=None) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (betas 0.9 / 0.999) with the linear schedule, for parameters
  in the per-layer layout (`model.unstack_layers`).

  `trainable` (a bool tree, `trainable_mask`) freezes the other leaves with optax: their updates
  are zero and they hold no optimiser state (DeeBERT stage 2 keeps Adam moments for the heads only).
  The clipping norm is taken over the trained leaves; a frozen leaf's gradient is zero in every
  method (outside the loss, or behind a stop-gradient), so it is the norm over all.
  """
  schedule = learning_rate_schedule(cfg)

  def adam_at(lr):
    if cfg.weight_decay == 0.0:  # the same updates without a pass of `0 * param` over every weight
      return optax.adam(lr, b1=0.9, b2=0.999, eps=cfg.adam_eps)
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask)

  if cfg.encoder_lr_scale != 1.0:
    # Two learning rates (the encoder's scaled), one global-norm clip over every gradient first.
    scale = cfg.encoder_lr_scale
    def group(path, t):
      return "frozen" if not t else ("heads" if path[0].key == "exits" else "encoder")
    def labels(params):
      mask = trainable if trainable is not None else jax.tree.map(lambda _: True, params)
      return jax.tree_util.tree_map_with_path(group, mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.multi_transform(
        {"heads": adam_at(schedule), "encoder": adam_at(lambda step: scale * schedule(step)),
         "frozen": optax.set_to_zero()}, labels))
  inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam_at(schedule))
  if trainable is None or all(jax.tree.leaves(trainable)):
    return inner
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


def stage_optimizer(cfg: OptimConfig, params, model_cfg: ModelConfig, method: str,
                    stage: int = 1) -> optax.GradientTransformation:
  """The optimiser of one stage of a method: `make_optimizer` frozen to what the stage trains."""
  return make_optimizer(cfg, trainable_mask(params, model_cfg, method, stage))


# ----------------------------------------------------------------------------- forward for training


def stage_forward(params, cfg: ModelConfig, batch, rng, plan: methods.StagePlan, taps_KxBxSxD=None):
  """Logits [len(plan.exits), B, C] with dropout on, running only what the stage needs (`model.forward`)."""
  return model_lib.forward(params, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           deterministic=False, rng=rng, exits=plan.exits, num_layers=plan.num_layers,
                           stop_gradient_exits=not plan.train_encoder, taps_KxBxSxD=taps_KxBxSxD,
                           active_BxLxS=batch.get("active_BxLxS")).exit_logits


def example_weights(batch) -> jax.Array:
  """The weight of each labelled unit: [B] 1 for real examples, 0 for the rows that pad a short
  batch; for a token task [B, S], 1 at the first piece of each word of a real example (the other
  pieces, padding and padding rows carry no label)."""
  real_B = (batch["example_ids"] >= 0).astype(jnp.float32)
  if "word_mask" in batch:
    return batch["word_mask"].astype(jnp.float32) * real_B[:, None]
  return real_B


def flat_units(logits, labels, weights):
  """Logits [E, B, (S,) C], labels and weights [B, (S)] -> [E, U, C], [U], [U]: a token task's
  words become the loss's units, so every loss (`losses.py`: weighted means over units) serves
  sentence and token exits alike (per-token CE averaged over the batch's words, as the reference)."""
  return logits.reshape(logits.shape[0], -1, logits.shape[-1]), labels.reshape(-1), weights.reshape(-1)


# ----------------------------------------------------------------------------- GR projection


def _projected_slices(grads, num_layers: int):
  """The GR vector's pieces (train layout): encoder weight matrices of layers 1..L-1, not the last."""
  return [grads["layers"][i][name]["kernel"] for i in range(num_layers - 1) for name in model_lib.ENCODER_MATRICES]


def project_conflicting(g_protected, g_other, num_layers: int):
  """method.md's GR: over the encoder matrices of layers 1..L-1 as one vector, if <gA, gB> < 0 then
  gB <- gB - <gA, gB> / |gA|^2 gA. Returns (gA + gB, stats); other parameters get gA + gB unchanged.
  Gradients in either layout; the result has the layout of the input."""
  stacked = not model_lib.is_unstacked(g_protected)
  g_protected, g_other = model_lib.unstack_layers(g_protected), model_lib.unstack_layers(g_other)
  a_parts = _projected_slices(g_protected, num_layers)
  b_parts = _projected_slices(g_other, num_layers)
  dot = sum(jnp.vdot(a, b) for a, b in zip(a_parts, b_parts))
  a_sq = sum(jnp.vdot(a, a) for a in a_parts)
  b_sq = sum(jnp.vdot(b, b) for b in b_parts)
  coef = jnp.where(dot < 0, dot / jnp.maximum(a_sq, _TINY), 0.0)
  summed = jax.tree.map(jnp.add, g_protected, g_other)   # fresh containers: safe to update below
  for i in range(num_layers - 1):
    for name in model_lib.ENCODER_MATRICES:
      summed["layers"][i][name]["kernel"] = (
          summed["layers"][i][name]["kernel"] - coef * g_protected["layers"][i][name]["kernel"])
  stats = {"gr_cos": dot / jnp.sqrt(jnp.maximum(a_sq * b_sq, _TINY)),
           "gr_norm_a": jnp.sqrt(a_sq), "gr_norm_b": jnp.sqrt(b_sq),
           "gr_projected": (dot < 0).astype(jnp.float32)}
  return (model_lib.stack_layers(summed) if stacked else summed), stats


# ----------------------------------------------------------------------------- the step


def split_micro_batches(batch, accum_steps: int):
  """[B, ...] -> [K, B/K, ...] with micro-batch k = rows k, K + k, 2K + k, ... (strided, not blocks):
  on a data-parallel mesh each device's contiguous rows then hold a share of every micro-batch, so
  the split moves no data between devices."""
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum_steps} micro-batches")
    return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_grads_fn(cfg: ModelConfig, loss_cfg: LossConfig, *, stage: int = 1, protect_final: bool = False,
                  accum_steps: int = 1) -> Callable:
  """`(params, batch, rng) -> (grads, (LossTerms, extra metrics))` of one method and stage.

  protect_final: GR group A (kept intact) is the final exit's term; else the highways' terms.
  accum_steps K: the batch runs as K micro-batches in a `lax.scan` (activations of one micro-batch
  at a time). Each micro-batch loss is scaled by its share of the batch's real examples, so the
  summed gradients are the full batch's (every loss here is a weighted batch mean); GR projects the
  accumulated gradients of its two groups, i.e. the full batch's. Dropout keys differ per micro-batch.
  """
  plan = loss_cfg.method_spec.stage(stage).plan(cfg.num_layers)
  mode = loss_cfg.gr if loss_cfg.uses_gr else "none"

  def loss_of_logits(logits, batch, scale) -> LossTerms:
    # The method's own per-unit inputs ([B, E, (S)] rows first -> [E, U], the units' order of flat_units).
    aux = {keyword: jnp.swapaxes(batch[key], 0, 1).reshape(batch[key].shape[1], -1)
           for key, keyword in loss_cfg.method_spec.unit_inputs}
    terms = loss_terms(*flat_units(logits, batch["labels"], example_weights(batch)), loss_cfg, stage, **aux)
    return terms if scale is None else LossTerms(terms.final * scale, terms.highway * scale)

  def plain_groups(params, batch, rng, scale):
    def total(p):
      terms = loss_of_logits(stage_forward(p, cfg, batch, rng, plan), batch, scale)
      return terms.total, terms
    grads, terms = jax.grad(total, has_aux=True)(params)
    return (grads,), terms, {}

  def penalty_groups(params, batch, rng, scale):
    """loss + lambda * mean_b |d highway_b / d h_b|^2 over the outputs of layers 1..L-1 (double backprop)."""
    B, S = batch["input_ids"].shape
    taps = jnp.zeros((cfg.num_layers - 1, B, S, cfg.hidden_size), jnp.float32)
    weights = example_weights(batch)

    def total(p):
      def highway_of_taps(t):
        terms = loss_of_logits(stage_forward(p, cfg, batch, rng, plan, taps_KxBxSxD=t), batch, None)
        return terms.highway, terms
      d_taps, terms = jax.grad(highway_of_taps, has_aux=True)(taps)
      penalty = jnp.maximum(weights.sum(), 1.0) * jnp.sum(d_taps ** 2)
      if scale is not None:
        terms, penalty = LossTerms(terms.final * scale, terms.highway * scale), penalty * scale
      return terms.total + loss_cfg.gr_lambda * penalty, (terms, penalty)
    grads, (terms, penalty) = jax.grad(total, has_aux=True)(params)
    return (grads,), terms, {"gr_penalty": penalty}

  def projection_groups(params, batch, rng, scale):
    """One forward, two cotangents pulled back: the final term's and the highway terms' gradients."""
    logits, pullback = jax.vjp(lambda p: stage_forward(p, cfg, batch, rng, plan), params)
    terms = loss_of_logits(logits, batch, scale)
    d_final = jax.grad(lambda z: loss_of_logits(z, batch, scale).final)(logits)
    d_highway = jax.grad(lambda z: loss_of_logits(z, batch, scale).highway)(logits)
    (g_final,), (g_highway,) = pullback(d_final), pullback(d_highway)
    return (g_final, g_highway), terms, {}

  groups_fn = {"projection": projection_groups, "penalty": penalty_groups, "none": plain_groups}[mode]

  def finish(groups, terms, extra):
    if mode != "projection":
      return groups[0], (terms, extra)
    g_final, g_highway = groups
    g_a, g_b = (g_final, g_highway) if protect_final else (g_highway, g_final)
    grads, stats = project_conflicting(g_a, g_b, cfg.num_layers)
    return grads, (terms, {**extra, **stats})

  def grads_fn(params, batch, rng):
    if accum_steps == 1:
      return finish(*groups_fn(params, batch, rng, None))
    total_weight = jnp.maximum(example_weights(batch).sum(), 1.0)

    def body(carry, xs):
      micro, k = xs
      scale = example_weights(micro).sum() / total_weight
      out = groups_fn(params, micro, jax.random.fold_in(rng, k), scale)
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        groups_fn, params, jax.tree.map(lambda x: x[0], split_micro_batches(batch, accum_steps)), rng, 1.0))
    summed, _ = jax.lax.scan(body, zeros, (split_micro_batches(batch, accum_steps), jnp.arange(accum_steps)))
    return finish(*summed)

  return grads_fn


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation, *,
                    stage: int = 1, protect_final: bool = False, schedule: Callable | None = None,
                    stage_offset: int = 0, donate: bool = True, accum_steps: int = 1,
                    state_sharding: Any = None) -> Callable:
  """A jitted `(state, batch) -> (state, metrics)` for one method and stage (state buffers donated).

  What the stage does not train is frozen by its optimiser (`stage_optimizer`).
  schedule / stage_offset: only to log the learning rate of the stage's schedule.
  accum_steps: gradient accumulation over that many micro-batches inside the step (`make_grads_fn`).
  state_sharding: shardings of the TrainState (`sharding.state_shardings`); the new state is held to
  them, so an FSDP-sharded state stays sharded from step to step.
  """
  grads_fn = make_grads_fn(cfg, loss_cfg, stage=stage, protect_final=protect_final, accum_steps=accum_steps)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, (terms, extra) = grads_fn(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": terms.total, "loss_final": terms.final, "loss_highway": terms.highway,
               "grad_norm": optax.tree.norm(grads), **extra}
    if schedule is not None:
      metrics["lr"] = schedule(state.step - stage_offset)
    new_state = TrainState(state.step + 1, params, opt_state, state.rng)
    if state_sharding is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
    return new_state, metrics

  return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int, step: int = 0) -> TrainState:
  """The state holds the parameters in the train layout (`model.unstack_layers`)."""
  params = model_lib.unstack_layers(params)
  return TrainState(jnp.asarray(step, jnp.int32), params, optimizer.init(params),
                    jax.random.PRNGKey(seed).astype(jnp.uint32))


def make_eval_step(cfg: ModelConfig, out_sharding: Any = None) -> Callable:
  """Jitted `(params, batch) -> exit_logits [E, B, C]`, dropout off. `out_sharding` (e.g. replicated
  over the mesh) makes the logits readable on every process of a multi-host job."""
  def eval_fn(params, batch):   # [E, B, C], or [E, B, S, C] for token exits
    return model_lib.forward(params, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             deterministic=True).exit_logits
  return jax.jit(eval_fn, out_shardings=out_sharding)
