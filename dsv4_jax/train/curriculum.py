"""The sequence-length curriculum: which stage (and which kind of step) a global step belongs to.

Stages run in order; a stage with `indexer_warmup_steps` = k begins with k indexer-only steps
(dense attention, KL loss only). Tokens per batch stay constant unless a stage sets batch_size.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.config import CurriculumStage, TrainConfig


@dataclasses.dataclass(frozen=True)
class StepKind:
  """What a train step computes; static under jit (one compilation per kind)."""
  attention: str  # "dense" | "sparse"
  indexer_loss: bool
  indexer_only: bool


@dataclasses.dataclass(frozen=True)
class StagePlan:
  index: int
  stage: CurriculumStage
  start: int  # first global step
  end: int  # one past the last
  batch_size: int

  def kind(self, step: int) -> StepKind:
    if step < self.start + self.stage.indexer_warmup_steps:
      return StepKind("dense", True, True)
    return StepKind(self.stage.attention, bool(self.stage.train_indexer), False)

  def kinds(self, start: int, end: int) -> list[StepKind]:
    """The distinct step kinds of global steps [start, end) of this stage, in order."""
    return list(dict.fromkeys(self.kind(step) for step in range(max(start, self.start), min(end, self.end))))

  def describe(self) -> str:
    s = self.stage
    warm = f", indexer warm-up {s.indexer_warmup_steps} steps" if s.indexer_warmup_steps else ""
    name = f" ({s.name})" if s.name else ""
    return (f"stage {self.index}{name}: seq_len {s.seq_len}, batch {self.batch_size}, "
            f"steps {self.start}..{self.end - 1}, {s.attention} attention{warm}")


def plan(cfg: TrainConfig) -> list[StagePlan]:
  plans, start = [], 0
  for i, stage in enumerate(cfg.curriculum):
    steps = cfg.stage_steps(stage)
    plans.append(StagePlan(i, stage, start, start + steps, cfg.stage_batch_size(stage)))
    start += steps
  return plans


def stage_at(plans: list[StagePlan], step: int) -> StagePlan | None:
  """The stage that contains global `step` (None once training is complete)."""
  for p in plans:
    if p.start <= step < p.end:
      return p
  return None
