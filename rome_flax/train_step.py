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

from rome_flax import model as model_lib
from rome_flax.config import ModelConfig
from rome_flax.losses import LossConfig, LossTerms, loss_terms

_TINY = 1e-30
_TRAINED = 1.0   # the gate of a fully trained leaf: its update is used as is


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
  """The train layout's tree of shapes (no copies): what masks over the train state are built on."""
  return jax.eval_shape(model_lib.unstack_layers, params)


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (betas 0.9 / 0.999) with the linear schedule, for parameters
  in the train layout (`model.unstack_layers`; stacked `params` are converted for the mask)."""
  schedule = learning_rate_schedule(cfg)
  if cfg.weight_decay == 0.0:  # the same updates without a pass of `0 * param` over every weight
    adam = optax.adam(schedule, b1=0.9, b2=0.999, eps=cfg.adam_eps)
  else:
    adam = optax.adamw(schedule, b1=0.9, b2=0.999, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                       mask=weight_decay_mask(_train_layout_like(params)))
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


# ----------------------------------------------------------------------------- what a stage trains


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Which layers and exits a step runs and which parameters it updates."""
  exits: tuple[int, ...]         # 0-based exits whose logits the loss sees
  num_layers: int                # encoder layers to run
  train_encoder: bool            # False: embeddings and layers frozen (DeeBERT stage 2)
  train_exits: tuple[int, ...]   # 0-based exits whose heads are updated


def stage_plan(cfg: ModelConfig, method: str, stage: int = 1) -> StagePlan:
  L = cfg.num_layers
  every = tuple(range(L))
  if method == "final_only" or (method == "deebert" and stage == 1):
    return StagePlan((L - 1,), L, True, (L - 1,))
  if method == "deebert":
    # Stage 2: only the highways learn; the last layer feeds no highway, so it is not even run.
    return StagePlan(every[:-1], L - 1, False, every[:-1])
  return StagePlan(every, L, True, every)


def trainable_mask(params, cfg: ModelConfig, plan: StagePlan):
  """1/0 factors per leaf of the train layout (one per exit head) that gate the updates."""
  params = _train_layout_like(params)
  encoder = _TRAINED if plan.train_encoder else 0.0
  return {
      "embeddings": jax.tree.map(lambda _: encoder, params["embeddings"]),
      "layers": jax.tree.map(lambda _: encoder, params["layers"]),
      "exits": tuple(jax.tree.map(lambda _: _TRAINED if i in plan.train_exits else 0.0, head)
                     for i, head in enumerate(params["exits"])),
  }


# ----------------------------------------------------------------------------- forward for training


def exits_forward(params, cfg: ModelConfig, batch, rng, plan: StagePlan, taps_KxBxSxD=None):
  """Logits [len(plan.exits), B, C] with dropout on, running only what the plan needs.

  `taps_KxBxSxD` (zeros) are added to the outputs of layers 1..K so that their gradient is the
  loss's gradient with respect to those hidden states (GR penalty mode). The dropout keys are
  those of `model.forward`, so the same rng gives the same masks.
  """
  mask_BxS = batch["attention_mask"]
  h_BxSxD = model_lib.embed(params, cfg, batch["input_ids"], mask_BxS, batch["token_type_ids"],
                            deterministic=False, rng=rng)
  mask_bias = model_lib.attention_bias(mask_BxS)
  # With 'cls' pooling the last layer run feeds only its exit's token 0: compute just that.
  short_last = model_lib.last_layer_first_token_only(cfg)
  logits = []
  for i in range(plan.num_layers):
    h_BxSxD = model_lib.run_layer(params, cfg, i, h_BxSxD, mask_bias, deterministic=False, rng=rng,
                                  first_token_only=short_last and i == plan.num_layers - 1)
    if taps_KxBxSxD is not None and i < taps_KxBxSxD.shape[0]:
      h_BxSxD = h_BxSxD + taps_KxBxSxD[i].astype(h_BxSxD.dtype)
    if i in plan.exits:
      h_exit = h_BxSxD if plan.train_encoder else jax.lax.stop_gradient(h_BxSxD)
      logits.append(model_lib.run_exit(params, cfg, i, h_exit, mask_BxS, deterministic=False, rng=rng))
  return jnp.stack(logits)


def example_weights(batch) -> jax.Array:
  """1 for real examples, 0 for the rows that pad a short batch."""
  return (batch["example_ids"] >= 0).astype(jnp.float32)


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


def make_grads_fn(cfg: ModelConfig, loss_cfg: LossConfig, *, stage: int = 1,
                  protect_final: bool = False) -> Callable:
  """`(params, batch, rng) -> (grads, (LossTerms, extra metrics))` of one method and stage.

  protect_final: GR group A (kept intact) is the final exit's term; else the highways' terms.
  """
  plan = stage_plan(cfg, loss_cfg.method, stage)

  def loss_of_logits(logits, batch) -> LossTerms:
    return loss_terms(logits, batch["labels"], example_weights(batch), loss_cfg, stage)

  def plain_grads(params, batch, rng):
    def total(p):
      terms = loss_of_logits(exits_forward(p, cfg, batch, rng, plan), batch)
      return terms.total, (terms, {})
    return jax.grad(total, has_aux=True)(params)

  def penalty_grads(params, batch, rng):
    """loss + lambda * mean_b |d highway_b / d h_b|^2 over the outputs of layers 1..L-1 (double backprop)."""
    B, S = batch["input_ids"].shape
    taps = jnp.zeros((cfg.num_layers - 1, B, S, cfg.hidden_size), jnp.float32)
    weights = example_weights(batch)

    def total(p):
      def highway_of_taps(t):
        terms = loss_of_logits(exits_forward(p, cfg, batch, rng, plan, taps_KxBxSxD=t), batch)
        return terms.highway, terms
      d_taps, terms = jax.grad(highway_of_taps, has_aux=True)(taps)
      penalty = jnp.maximum(weights.sum(), 1.0) * jnp.sum(d_taps ** 2)
      return terms.total + loss_cfg.gr_lambda * penalty, (terms, {"gr_penalty": penalty})
    return jax.grad(total, has_aux=True)(params)

  def projection_grads(params, batch, rng):
    logits, pullback = jax.vjp(lambda p: exits_forward(p, cfg, batch, rng, plan), params)
    terms = loss_of_logits(logits, batch)
    d_final = jax.grad(lambda z: loss_of_logits(z, batch).final)(logits)
    d_highway = jax.grad(lambda z: loss_of_logits(z, batch).highway)(logits)
    (g_final,), (g_highway,) = pullback(d_final), pullback(d_highway)
    g_a, g_b = (g_final, g_highway) if protect_final else (g_highway, g_final)
    grads, stats = project_conflicting(g_a, g_b, cfg.num_layers)
    return grads, (terms, stats)

  if loss_cfg.uses_gr and loss_cfg.gr == "projection":
    return projection_grads
  if loss_cfg.uses_gr and loss_cfg.gr == "penalty":
    return penalty_grads
  return plain_grads


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation,
                    params_like, *, stage: int = 1, protect_final: bool = False,
                    schedule: Callable | None = None, stage_offset: int = 0,
                    donate: bool = True) -> Callable:
  """A jitted `(state, batch) -> (state, metrics)` for one method and stage (state buffers donated).

  Updates of parameters the stage does not train are zeroed (weight decay included).
  schedule / stage_offset: only to log the learning rate of the stage's schedule.
  """
  plan = stage_plan(cfg, loss_cfg.method, stage)
  gate = trainable_mask(params_like, cfg, plan)
  gate_all_ones = plan.train_encoder and len(plan.train_exits) == cfg.num_layers
  grads_fn = make_grads_fn(cfg, loss_cfg, stage=stage, protect_final=protect_final)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, (terms, extra) = grads_fn(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if not gate_all_ones:
      updates = jax.tree.map(lambda u, g: u if g is _TRAINED else u * g, updates, gate)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": terms.total, "loss_final": terms.final, "loss_highway": terms.highway,
               "grad_norm": optax.tree.norm(grads), **extra}
    if schedule is not None:
      metrics["lr"] = schedule(state.step - stage_offset)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int, step: int = 0) -> TrainState:
  """The state holds the parameters in the train layout (`model.unstack_layers`)."""
  params = model_lib.unstack_layers(params)
  return TrainState(jnp.asarray(step, jnp.int32), params, optimizer.init(params),
                    jax.random.PRNGKey(seed).astype(jnp.uint32))


def make_eval_step(cfg: ModelConfig) -> Callable:
  """Jitted `(params, batch) -> exit_logits [E, B, C]`, dropout off."""
  def eval_fn(params, batch):
    return model_lib.forward(params, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             deterministic=True).exit_logits
  return jax.jit(eval_fn)
