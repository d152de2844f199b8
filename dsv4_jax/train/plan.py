"""`dsv4 plan`: what one training step of a config needs per chip on N chips, computed without devices.

For each curriculum stage (seq_len S, batch of B rows, its attention mode) on the config's mesh resolved over
N chips (an abstract mesh: `jax.sharding.AbstractMesh`, so no device is needed):

Memory per chip (bytes)
  parameters   Σ_p |p|·itemsize / shards(p)      shards(p): the product of the mesh axes its logical axes map
                                                 to (`parallel.mesh.logical_to_spec`, LOGICAL_RULES), as placed
  optimizer    Σ_muon 4|p| / shards(p)  +  Σ_adamw 2·4|p| / shards(p)   (Muon momentum; Adam's two moments;
                                                 each parameter's `optimizer` metadata, optim/partition.py)
  gradients    = parameters (fp32, laid out like them: reduce-scattered to the parameter's shards)
  other state  router biases, hash tables (not trained by gradients)
  batch        the five [B, S] int32/fp32 arrays the step reads and the routing indices [R, B, S, K] int32
  activations  per chip: (T_chip · other + T_moe · moe) / S bytes, for the per-row bytes `other` and `moe`
               (made by the routed experts' code) of the two below; T_chip = rows_chip · S / C the batch's
               tokens a chip holds (C = context), T_moe the tokens whose routed experts it runs (`moe_tokens`:
               with expert parallelism the batch's tokens over the batch axes, not over context; without it,
               all of the batch's tokens, as XLA does not split the experts' sort)
               saved:       the bytes autodiff keeps from the forward for the backward pass (remat "none":
                            every intermediate; "full": each block's input X [S, N, d]; "save_dots": the
                            projections' outputs)
               recomputed:  with remat, the largest single block's intermediates, recomputed in its backward
                            pass on top of the saved inputs (0 without remat: a block's backward then
                            consumes its saved values as it makes the cotangents, adding no second copy)
               Both are measured, not estimated: the training loss (or one block) is traced with abstract
               shapes and `saved_residuals` lists what the backward pass receives. One row's bytes are the
               difference of the traces at 2 and 1 rows, which leaves out weight-derived values (transposed
               or cast parameter copies) that do not grow with the batch. With an `expert` axis of P > 1 the
               trace runs on an abstract mesh of P devices, so that it includes the dispatch buffers of expert
               parallelism (capacity factor × the tokens' copies).
  Newton–Schulz  the largest Muon parameter gathered over `fsdp` (XLA orthogonalises whole matrices), ×3
               (the iterate, its Gram matrix and the product); it is needed after the backward pass, when
               the activations are freed
  peak = parameters + optimizer + gradients + other state + batch + max(activations, Newton–Schulz)

Compute: 3 · forward FLOPs per token (train/flops.py, the architecture's count) · B·S tokens; step time =
FLOPs / (N · peak bf16 FLOP/s · MFU). MFU counts the model's FLOPs only (rematerialisation is part of
the efficiency lost).

Communication per chip per step (bytes each chip sends; ring algorithms: an all-gather or reduce-scatter
over g chips moves (g−1)/g of the gathered size, an all-reduce twice that; `passes` = 2 forward passes
(one recomputed) with remat, else 1):
  fsdp all-gather        parameters split over fsdp, gathered for the forward and the backward pass
  fsdp reduce-scatter    their gradients
  Muon all-gather        the Muon parameters split over fsdp, gathered once more by the optimizer
  gradient all-reduce    each gradient over the batch axes that split the batch but not the parameter
                         (data; fsdp / expert / context for the parameters they do not split)
  expert all-to-all      per MoE layer: dispatch (compute dtype + int32 expert id) and combine (fp32) buffers
                         of P·cap rows each, per pass, and the backward's transposed pair
  context all-gather     per compressed layer: the compressed entries (and CSA's indexer keys) of every
                         shard, per pass, plus their gradients' reduce-scatter; the window halo is W−1 rows
  tensor all-reduce      per block, the attention and MoE outputs [tokens, d] (Megatron-style estimate: the
                         tensor axis is left to XLA's partitioner)
The bandwidth that would hide all of it under the compute is the total over the step time.

KV cache: the decoding cache of one sequence of S tokens (layers/cache.py, mixed FP8/BF16 storage).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # the function behind jax.ad_checkpoint.print_saved_residuals
from jax.sharding import AbstractMesh, AxisType

from dsv4_jax.config import ConfigError, CurriculumStage, ModelConfig, TrainConfig
from dsv4_jax.data.packing import empty_row
from dsv4_jax.layers.block import Block
from dsv4_jax.layers.cache import cache_bytes, init_cache
from dsv4_jax.layers.layer_groups import layer_kind, run_block
from dsv4_jax.layers.linear import MUON
from dsv4_jax.layers.model import MTPBlock, Transformer
from dsv4_jax.optim.partition import key_path_names, param_group
from dsv4_jax.parallel.mesh import LOGICAL_RULES, MESH_AXES, logical_to_spec, spec_axes
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.flops import forward_flops_per_token
from dsv4_jax.train.losses import training_losses
from dsv4_jax.train.step import routing_shape

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: HBM bytes and peak dense bf16 FLOP/s, as its vendor states them (10^9 bytes per GB)."""
  name: str
  hbm: float
  bf16_flops: float


CHIPS = {
    # Google Cloud TPU docs, "TPU v5p": 459 TFLOPs bf16 per chip, 95 GB HBM2e, 8960 chips per pod.
    "v5p": Chip("TPU v5p", 95e9, 459e12),
    # Google Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOPs bf16 per chip, 32 GB HBM, 256 chips per pod.
    "v6e": Chip("TPU v6e", 32e9, 918e12),
    # NVIDIA H100 SXM datasheet: 989 TFLOPS dense BF16 (1979 with 2:4 sparsity), 80 GB HBM3.
    "h100": Chip("H100 SXM", 80e9, 989e12),
    # NVIDIA H200 SXM datasheet: the H100's 989 TFLOPS dense BF16, 141 GB HBM3e.
    "h200": Chip("H200 SXM", 141e9, 989e12),
    # NVIDIA DGX B200 datasheet: 1,440 GB for 8 GPUs (180 GB each); 2.25 PFLOPS dense BF16 per GPU
    # (4.5 with 2:4 sparsity).
    "b200": Chip("B200", 180e9, 2.25e15),
}

BATCH_AXES = LOGICAL_RULES["batch"]  # the mesh axes that split a batch's rows
# The batch arrays a train step reads (int32 / fp32; `target_bytes` is read by evaluation only).
TRAIN_INPUTS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
NS_COPIES = 3  # Newton–Schulz: the iterate X, its Gram matrix X·Xᵀ and the polynomial's product


def chip_spec(name: str) -> Chip:
  if name not in CHIPS:
    raise ConfigError(f"--chip {name}: expected one of {', '.join(CHIPS)}")
  return CHIPS[name]


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  """An abstract mesh with the axes of `parallel.mesh.make_mesh` (no devices)."""
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --- the abstract model -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter (or other state variable): its shape, itemsize, logical axes, optimizer group."""
  path: str
  shape: tuple[int, ...]
  itemsize: int
  axes: tuple
  group: str | None  # "muon" | "adamw"; None: not a parameter

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def split_by(self, sizes: dict[str, int]) -> list[str]:
    """The mesh axes that split it on a mesh of `sizes` (as placed: `logical_to_spec`)."""
    return spec_axes(logical_to_spec(self.axes, self.shape, abstract_mesh(sizes)))

  def shards(self, sizes: dict[str, int], without: str | None = None) -> int:
    """Chips one copy is split over on a mesh of `sizes` (`without`: as if that axis did not split it)."""
    return math.prod(sizes[a] for a in self.split_by(sizes) if a != without)


@functools.lru_cache(maxsize=4)
def abstract_model(model: ModelConfig):
  """-> (graphdef, params, extra, [Leaf] of params, [Leaf] of extra) of the model, all abstract
  (`nnx.eval_shape`: nothing is allocated). Layers are scanned (the same variables, stacked), which makes
  the traces below faster; the bytes are those of the unrolled model."""
  cfg = model.replace(scan_layers=True)
  graphdef, params, extra = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

  def leaves(state, trained):
    out = []
    for kp, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
      path = key_path_names(kp)
      value = var.get_value()
      axes = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
      out.append(Leaf(".".join(map(str, path)), tuple(value.shape), jnp.dtype(value.dtype).itemsize, tuple(axes),
                      param_group(path, var) if trained else None))
    return out

  return graphdef, params, extra, leaves(params, True), leaves(extra, False)


# --- activations: traced residuals -------------------------------------------------------------------

# Source files of the routed experts: their values are laid out by tokens, not by (rows, sequence).
MOE_SOURCES = ("dsv4_jax/layers/moe.py", "dsv4_jax/parallel/expert.py")


@dataclasses.dataclass(frozen=True)
class Residuals:
  """Bytes the backward pass receives from the forward: made by the MoE (MOE_SOURCES) and by the rest."""
  moe: float
  other: float

  def __sub__(self, other: "Residuals") -> "Residuals":
    return Residuals(self.moe - other.moe, self.other - other.other)


def residuals(fn, *args) -> Residuals:
  """What the backward pass of `fn(*args)` receives from the forward (abstract `args`), the arguments
  themselves not counted, split by where it was made (`saved_residuals` names the source line)."""
  moe = other = 0
  for aval, where in saved_residuals(fn, *args):
    if where.startswith("from the argument"):
      continue
    size = int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
    if any(source in where for source in MOE_SOURCES):
      moe += size
    else:
      other += size
  return Residuals(moe, other)


def _batch(rows: int, seq_len: int) -> dict:
  return {k: jax.ShapeDtypeStruct((rows, seq_len), v.dtype) for k, v in empty_row(seq_len, 0).items()}


def _per_row(trace, expert: int) -> Residuals:
  """Bytes per row of the whole batch: trace(rows) at 2 and 1 rows, on an abstract mesh with `expert`
  devices when > 1 (then the expert-parallel dispatch buffers are part of it)."""
  def at(rows):
    if expert == 1:
      return trace(rows)
    with jax.sharding.use_abstract_mesh(abstract_mesh({**{a: 1 for a in MESH_AXES}, "expert": expert})):
      return trace(rows)

  return at(2) - at(1)


@functools.lru_cache(maxsize=32)
def saved_per_row(model: ModelConfig, seq_len: int, kind: StepKind, expert: int) -> Residuals:
  """What the train step's loss keeps for its backward pass, per row of `seq_len` tokens (under model.remat)."""
  graphdef, params, extra, _, _ = abstract_model(model)

  def loss(params, extra, batch, routing):  # train/step.py's loss; its weights do not change what is saved
    out = nnx.merge(graphdef, params, extra)(
        batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
        attention_mode=kind.attention, with_indexer_loss=kind.indexer_loss, with_mtp=not kind.indexer_only,
        routing=routing)
    return training_losses(out, batch, mtp_weight=0.3, balance_weight=1e-4, indexer_weight=1.0,
                           indexer_only=kind.indexer_only)["total"]

  def trace(rows):
    routing = jax.ShapeDtypeStruct(routing_shape(model, rows, seq_len), jnp.int32)
    return residuals(loss, params, extra, _batch(rows, seq_len), routing)

  return _per_row(trace, expert)


@functools.lru_cache(maxsize=32)
def recomputed_per_row(model: ModelConfig, seq_len: int, kind: StepKind, expert: int) -> Residuals:
  """The largest block's intermediates under remat "none", per row of `seq_len` tokens (one block of each
  kind is traced: (compress ratio, hash-routed) of the main layers, and the MTP block)."""
  layers = {layer_kind(model, i): i for i in reversed(range(model.num_hidden_layers))}
  blocks = [(Block, layer) for layer in layers.values()]
  if model.num_nextn_predict_layers:
    blocks.append((MTPBlock, model.num_hidden_layers))
  d, n = model.hidden_size, model.hc_mult

  def one(cls, layer):
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: cls(model, layer, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def loss(params, rest, x, ids, positions, segment_ids):
      block = nnx.merge(graphdef, params, rest)
      y, aux, _ = run_block(block, x, ids, positions, segment_ids, remat="none", attention_mode=kind.attention,
                            with_indexer_loss=kind.indexer_loss)
      return jnp.sum(y) + aux.get("indexer_loss", 0.0) + aux.get("balance_loss", 0.0)

    def trace(rows):
      ints = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
      x = jax.ShapeDtypeStruct((rows, seq_len, n, d), jnp.float32)
      return residuals(loss, params, rest, x, ints, ints, ints)

    return _per_row(trace, expert)

  return max((one(cls, layer) for cls, layer in blocks), key=lambda r: r.moe + r.other)


# --- the plan ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage's step on one mesh: bytes per chip, FLOPs, seconds and bytes sent per collective."""
  name: str
  seq_len: int
  rows: int
  attention: str
  sizes: dict[str, int]
  rows_chip: float  # rows of the batch each chip computes (whole rows; the context axis splits each)
  memory: dict[str, float]  # per chip: parameters, optimizer, gradients, other state, batch, activations, peak
  hbm: float
  flops: float  # per step, all chips
  step_seconds: float
  comm: dict[str, float]  # bytes each chip sends per step, per collective
  kv_cache: float  # bytes of one sequence's decoding cache at seq_len
  smallest: int | None  # the fewest chips (on this mesh, its −1 axis resized) whose peak fits; None: none up to
  warnings: tuple[str, ...] = ()

  @property
  def peak(self) -> float:
    return self.memory["peak"]

  @property
  def fits(self) -> bool:
    return self.peak <= self.hbm


def _stage_kind(stage: CurriculumStage) -> StepKind:
  return StepKind(stage.attention, bool(stage.train_indexer), False)


def _batch_split(rows: int, seq_len: int, sizes: dict[str, int]) -> tuple[int, int, set[str]]:
  """(chips splitting the rows, chips splitting each sequence, the mesh axes doing either): `logical_to_spec`
  of the batch [B, S] (an axis that does not divide is skipped)."""
  rows_spec, seq_spec = logical_to_spec(("batch", "seq"), (rows, seq_len), abstract_mesh(sizes))
  row_axes, seq_axes = spec_axes([rows_spec]), spec_axes([seq_spec])
  return math.prod(sizes[a] for a in row_axes), math.prod(sizes[a] for a in seq_axes), {*row_axes, *seq_axes}


def state_bytes(cfg: TrainConfig, sizes: dict[str, int]) -> dict[str, float]:
  """Per chip: parameters, optimizer state, gradients and other state (router biases, hash tables)."""
  _, _, _, params, extra = abstract_model(cfg.model)
  own = [leaf.size * leaf.itemsize / leaf.shards(sizes) for leaf in params]
  optimizer = sum(4 * leaf.size / leaf.shards(sizes) * (1 if leaf.group == MUON else 2) for leaf in params)
  return {"parameters": sum(own), "optimizer": optimizer, "gradients": sum(own),
          "other state": sum(leaf.size * leaf.itemsize / leaf.shards(sizes) for leaf in extra)}


def newton_schulz_bytes(cfg: TrainConfig, sizes: dict[str, int]) -> float:
  """The Newton–Schulz working set: the largest Muon parameter gathered over fsdp, fp32, NS_COPIES times.
  A parameter is one layer's, or, with scan_layers, all its group's layers stacked (orthogonalised at once)."""
  _, _, _, params, _ = abstract_model(cfg.model)

  def layers(leaf):  # the abstract model is scanned: its stacked leaves hold `shape[0]` layers
    return leaf.shape[0] if leaf.axes[0] == "layers" and not cfg.model.scan_layers else 1

  return max((NS_COPIES * 4 * leaf.size / leaf.shards(sizes, without="fsdp") / layers(leaf) for leaf in params
              if leaf.group == MUON), default=0.0)


def communication(cfg: TrainConfig, sizes: dict[str, int], rows: int, seq_len: int) -> dict[str, float]:
  """Bytes each chip sends per step, per collective (module docstring)."""
  model = cfg.model
  _, _, _, params, _ = abstract_model(model)
  passes = 1 if model.remat == "none" else 2  # forward passes (the backward recomputes one)
  compute = jnp.dtype(model.dtype).itemsize
  row_split, ctx, split = _batch_split(rows, seq_len, sizes)

  def ring(g):
    return (g - 1) / g

  f = sizes["fsdp"]
  comm = dict.fromkeys(("fsdp all-gather", "fsdp reduce-scatter", "Muon all-gather", "gradient all-reduce",
                        "expert all-to-all", "context all-gather", "tensor all-reduce"), 0.0)
  for leaf in params:
    gathered = leaf.size * leaf.itemsize / leaf.shards(sizes, without="fsdp")  # its fsdp shards put together
    on = set(leaf.split_by(sizes))
    if "fsdp" in on:
      comm["fsdp all-gather"] += 2 * ring(f) * gathered  # forward; backward (with its recomputation)
      comm["fsdp reduce-scatter"] += ring(f) * gathered
      if leaf.group == MUON:
        comm["Muon all-gather"] += ring(f) * gathered
    replicas = math.prod(sizes[a] for a in split - on)
    comm["gradient all-reduce"] += 2 * ring(replicas) * leaf.size * 4 / leaf.shards(sizes)
  layers = model.num_layers_total
  p = sizes["expert"]
  if p > 1:  # parallel/expert.py: cap slots per destination and wave
    slots = p * model.moe_waves * math.ceil(model.moe_capacity_factor * moe_tokens(rows, seq_len, sizes)
                                            * model.num_experts_per_tok / p / model.moe_waves)
    dispatch = slots * (model.hidden_size * compute + 4)  # token copies and their expert ids
    combine = slots * model.hidden_size * 4
    backward = slots * model.hidden_size * (4 + compute)  # the transposed pair
    comm["expert all-to-all"] = layers * ring(p) * (passes * (dispatch + combine) + backward)
  c = sizes["context"]
  if c > 1:  # parallel/context.py
    for r in model.compress_ratios:
      entries = seq_len / r if r else 0
      width = model.head_dim * 4 + 4 + (model.index_head_dim * 4 if r == 4 else 0)  # fp32 entries, segment ids
      halo = (model.sliding_window - 1) * model.head_dim * compute
      comm["context all-gather"] += rows / row_split * (passes + 1) * (ring(c) * entries * width + halo)
  t = sizes["tensor"]
  if t > 1:
    tokens = rows / row_split * seq_len / ctx
    comm["tensor all-reduce"] = layers * 2 * (passes + 1) * 2 * ring(t) * tokens * model.hidden_size * compute
  return comm


def moe_tokens(rows: int, seq_len: int, sizes: dict[str, int]) -> float:
  """Tokens whose routed experts one chip computes. With expert parallelism (parallel/expert.py) the
  batch's tokens are split over every batch axis, not over `context`: each context chip runs its rows'
  whole sequences. Without it, XLA does not split the experts' sort of the flattened tokens over the
  batch axes: every chip runs all of them."""
  if sizes["expert"] == 1:
    return rows * seq_len
  return rows * seq_len / math.prod(sizes[a] for a in BATCH_AXES)


def memory_per_chip(cfg: TrainConfig, stage: CurriculumStage, rows: int, sizes: dict[str, int]) -> dict[str, float]:
  """Bytes per chip of one stage's train step (module docstring), "peak" included."""
  model = cfg.model
  seq_len = stage.seq_len
  kind = _stage_kind(stage)
  row_split, ctx, _ = _batch_split(rows, seq_len, sizes)
  tokens = rows / row_split * seq_len / ctx  # tokens of the batch one chip holds
  moe = moe_tokens(rows, seq_len, sizes)

  def per_chip(r: Residuals) -> float:
    return (tokens * r.other + moe * r.moe) / seq_len

  memory = state_bytes(cfg, sizes)
  routed_layers = routing_shape(model, 1, seq_len)[0]
  memory["batch"] = tokens * 4 * (len(TRAIN_INPUTS) + routed_layers * model.num_experts_per_tok)
  memory["activations: saved"] = per_chip(saved_per_row(model, seq_len, kind, sizes["expert"]))
  memory["activations: recomputed"] = 0.0 if model.remat == "none" else per_chip(
      recomputed_per_row(model, seq_len, kind, sizes["expert"]))
  memory["Newton-Schulz"] = newton_schulz_bytes(cfg, sizes)
  activations = memory["activations: saved"] + memory["activations: recomputed"]
  memory["peak"] = (sum(memory[k] for k in ("parameters", "optimizer", "gradients", "other state", "batch"))
                    + max(activations, memory["Newton-Schulz"]))
  return memory


def plan_stage(cfg: TrainConfig, stage: CurriculumStage, rows: int, chip: Chip, chips: int, mfu: float) -> StagePlan:
  """The plan of one stage's train step on `chips` chips of `chip` (module docstring)."""
  model = cfg.model
  sizes = cfg.mesh.axis_sizes(chips, model.n_routed_experts)
  seq_len = stage.seq_len
  row_split, _, split = _batch_split(rows, seq_len, sizes)
  memory = memory_per_chip(cfg, stage, rows, sizes)
  flops = 3 * forward_flops_per_token(model, seq_len, attention=stage.attention) * rows * seq_len
  warnings = []
  idle = [f"{a} {sizes[a]}" for a in (*BATCH_AXES, "context") if sizes[a] > 1 and a not in split]
  if idle:
    warnings.append(f"batch [{rows}, {seq_len}] does not split over {', '.join(idle)}: those chips compute copies")
  if sizes["expert"] == 1 and row_split * sizes["context"] > 1:
    warnings.append("no expert axis: every chip runs the routed experts on all the batch's tokens (XLA does not "
                    "split their sort over the batch axes); use mesh.expert > 1")
  elif sizes["context"] > 1:
    warnings.append(f"the routed experts are not split over context {sizes['context']}: each context chip runs "
                    f"them on its rows' whole sequences")
  return StagePlan(
      name=stage.name or f"seq {seq_len}", seq_len=seq_len, rows=rows, attention=stage.attention, sizes=sizes,
      rows_chip=rows / row_split, memory=memory, hbm=chip.hbm, flops=flops,
      step_seconds=flops / (chips * chip.bf16_flops * mfu), comm=communication(cfg, sizes, rows, seq_len),
      kv_cache=cache_bytes(jax.eval_shape(lambda: init_cache(model, 1, seq_len, "mixed"))),
      smallest=smallest_fit(cfg, stage, rows, chip),
      warnings=tuple(warnings))


MAX_CHIPS = 1 << 20


def smallest_fit(cfg: TrainConfig, stage: CurriculumStage, rows: int, chip: Chip) -> int | None:
  """The fewest chips on which the stage's peak fits the chip's HBM: the mesh's fixed axes times
  {1, 3, 5, 9, 15, 45} · 2^k chips on its −1 axis (the report's batches hold a factor 9 or 45: 18,432 and
  23,040 rows of 4K), or its one size when no axis is −1; None if none up to MAX_CHIPS."""
  fixed = math.prod(size for _, size in cfg.mesh.items() if size != -1)
  if all(size != -1 for _, size in cfg.mesh.items()):
    counts = [fixed]
  else:
    counts = sorted({fixed * m * 2 ** k for m in (1, 3, 5, 9, 15, 45) for k in range(21)
                     if fixed * m * 2 ** k <= MAX_CHIPS})
  for n in counts:
    try:
      sizes = cfg.mesh.axis_sizes(n, cfg.model.n_routed_experts)
    except ConfigError:
      continue
    if memory_per_chip(cfg, stage, rows, sizes)["peak"] <= chip.hbm:
      return n
  return None


def plan(cfg: TrainConfig, chip: str, chips: int, *, seq_len: int | None = None, mfu: float = 0.4) -> list[StagePlan]:
  """The plans of the curriculum's stages (only those of `seq_len`, if given; a stage of its own at
  tokens_per_batch // seq_len rows and sparse attention if none has it)."""
  spec = chip_spec(chip)
  if chips < 1:
    raise ConfigError(f"--chips {chips}: expected a positive number of chips")
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu {mfu}: expected a fraction in (0, 1]")
  cfg.mesh.axis_sizes(chips, cfg.model.n_routed_experts)   # ConfigError if the mesh does not fit
  stages = list(cfg.curriculum)
  if seq_len is not None:
    stages = [s for s in stages if s.seq_len == seq_len] or [CurriculumStage(seq_len=seq_len, steps=1,
                                                                             attention="sparse")]
  return [plan_stage(cfg, s, cfg.stage_batch_size(s), spec, chips, mfu) for s in stages]


# --- the table -------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
  return f"{x / GIB:,.2f}"


def _si(x: float) -> str:
  """3 significant digits and an SI prefix: 75.5M, 7.25E (FLOPs), 10.0M, 256."""
  prefix, scale = next(((p, s) for p, s in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                                             ("K", 1e3)) if x >= s * (1 - 5e-4)), ("", 1))  # 999.9K is 1.00M
  v = x / scale
  return f"{v:.{2 if v < 9.995 else 1 if v < 99.95 else 0}f}{prefix}"


def format_plan(plans: list[StagePlan], chip: str, chips: int, mfu: float, name: str = "") -> str:
  """A table: one column per stage; memory in GiB per chip, communication in GiB per chip per step."""
  spec = CHIPS[chip]
  first = plans[0]
  mesh = ", ".join(f"{a} {s}" for a, s in first.sizes.items() if s > 1) or "1 chip"
  lines = [f"plan {name}: {chips:,} × {spec.name} ({spec.hbm / 1e9:,.0f} GB HBM = {spec.hbm / GIB:,.1f} GiB, "
           f"{spec.bf16_flops / 1e12:,.0f} TFLOP/s bf16); mesh ({mesh}); MFU {mfu:.0%}"]
  rows: list[tuple[str, list[str]]] = [
      ("seq_len × rows", [f"{p.seq_len:,} × {p.rows:,}" for p in plans]),
      ("attention", [p.attention for p in plans]),
      ("tokens / step", [_si(p.seq_len * p.rows) for p in plans]),
      ("rows / chip", [f"{p.rows_chip:,.2f}" for p in plans]),
      ("memory / chip (GiB)", [""] * len(plans)),
  ]
  for key in first.memory:
    rows.append((f"  {key}", [_gib(p.memory[key]) for p in plans]))
  rows += [
      ("  fits in HBM", ["yes" if p.fits else "NO" for p in plans]),
      ("  fewest chips", [f"{p.smallest:,}" if p.smallest else "none" for p in plans]),
      ("compute", [""] * len(plans)),
      ("  FLOP / step", [_si(p.flops) for p in plans]),
      (f"  step at {mfu:.0%} MFU (s)", [f"{p.step_seconds:,.2f}" for p in plans]),
      ("  tokens / s", [_si(p.seq_len * p.rows / p.step_seconds) for p in plans]),
      ("comm / chip / step (GiB)", [""] * len(plans)),
  ]
  for key in first.comm:
    rows.append((f"  {key}", [_gib(p.comm[key]) for p in plans]))
  rows += [
      ("  total", [_gib(sum(p.comm.values())) for p in plans]),
      ("  GB/s to hide it", [f"{sum(p.comm.values()) / p.step_seconds / 1e9:,.1f}" for p in plans]),
      ("KV cache / sequence (GiB)", [_gib(p.kv_cache) for p in plans]),
  ]
  label = max(len(r[0]) for r in rows) + 2
  width = max(len(cell) for _, cells in rows for cell in cells + [p.name for p in plans]) + 2
  lines.append(f"{'':{label}}" + "".join(f"{p.name:>{width}}" for p in plans))
  for head, cells in rows:
    lines.append((f"{head:{label}}" + "".join(f"{c:>{width}}" for c in cells)).rstrip())
  for p in plans:
    for w in p.warnings:
      lines.append(f"note ({p.name}): {w}")
  return "\n".join(lines)
