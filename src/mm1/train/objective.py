"""The one structure every stage objective returns, so the trainer runs every stage the same way.

A stage's training module (`MLLMObjective` for pre-training and SFT, `EncoderPretrainer` for the
encoder stage) has two methods:

    units(batch) -> int               how many units this micro-batch's loss sums over, known
                                      before the forward (target tokens; 1 for a batch-level loss)
    forward(batch) -> ObjectiveOutput the loss summed over those units, plus what the log reports

The trainer sums `units` over the global batch (every rank, every micro-step), back-propagates
`loss_sum / global_units` (times the world size: DDP/FSDP average gradients) plus `aux_loss / accum`,
and logs `loss = sum(loss_sum) / global_units` (+ aux). A token-level loss is thus the mean over every
target token of the global batch; a batch-level loss (the contrastive and AIM objectives, one unit per
micro-batch) the mean over micro-batches and ranks.

    micro-batch ──units(batch)──────────────────────────► Σ over ranks × micro-steps = global_units
         └──────forward(batch)──► loss_sum, aux_loss?, per_source?, metrics
                                     │        │           │            └► mean over micro-steps, ranks
                                     │        │           └► loss_<kind> = Σ sums / Σ counts
                                     │        └► aux_loss (+ lm_loss) in the log
                                     └► loss
"""

from __future__ import annotations

from typing import NotRequired, Protocol, TypedDict

import torch


class ObjectiveOutput(TypedDict):
    """One micro-batch's result. A plain dict (not a dataclass) so that DDP and FSDP2, which walk a
    module's outputs as pytrees to hook their tensors, see every tensor in it."""

    loss_sum: torch.Tensor  # scalar: the loss summed over `units(batch)` units
    metrics: dict[str, torch.Tensor]  # scalars averaged over micro-steps and ranks (retrieval_acc, moe_*)
    aux_loss: NotRequired[torch.Tensor]  # scalar added once per micro-step (MoE balance); absent = none
    per_source: NotRequired[torch.Tensor]  # [2, len(KINDS.names())]: loss sums and unit counts per data kind


class StageObjective(Protocol):
    """What the trainer needs from a stage's training module."""

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput: ...
