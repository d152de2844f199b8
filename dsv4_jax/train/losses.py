"""Training losses.

  next-token CE   L = Σ_t m_t · (−log softmax(logits_t)[y_t]) / Σ_t m_t           (m: loss mask, real tokens)
  MTP CE          the MTP logits at t predict y_{t+1} (token t+2); masked where t+1 is padding or
                  starts another document
  total           L + w_mtp · L_mtp + w_bal · (balance loss) + w_idx · (indexer KL)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """logits [B, T, V], targets [B, T], mask [B, T] -> (mean loss over mask, sum of losses, mask count)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  total, count = jnp.sum(nll * mask), jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), total, count


def mtp_mask(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, S] -> [B, S−1]: position t's MTP target y_{t+1} is real and in t's document."""
  return (loss_mask[:, 1:] > 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])


def training_losses(out, batch: dict, *, mtp_weight, balance_weight: float, indexer_weight: float,
                    indexer_only: bool = False) -> dict:
  """Scalar losses from a ModelOutput and a batch {targets, loss_mask, segment_ids}; "total" is optimised."""
  ce, ce_sum, tokens = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
  losses = {"loss": ce, "loss_sum": ce_sum, "tokens": tokens}
  balance = out.aux["balance_loss"]
  indexer = out.aux["indexer_loss"]
  total = ce + balance_weight * balance
  if out.mtp_logits is not None:
    mtp, _, _ = cross_entropy(out.mtp_logits, batch["targets"][:, 1:],
                              mtp_mask(batch["loss_mask"], batch["segment_ids"]))
    losses["mtp_loss"] = mtp
    total = total + mtp_weight * mtp
    balance = balance + out.aux["mtp_balance_loss"]
    total = total + balance_weight * out.aux["mtp_balance_loss"]
  losses.update(balance_loss=balance, indexer_loss=indexer)
  losses["total"] = indexer_weight * indexer if indexer_only else total + indexer_weight * indexer
  return losses
