"""The image-reliance probe of a training run: `loss_probe` and `loss_shuffled` in metrics.jsonl.

Every `train.eval_every` steps the model scores one fixed batch twice, without gradients: with its
own images (`loss_probe`) and with the images deranged across samples (`loss_shuffled`: each image
replaced by one from another document, `mm1.eval.shuffle.derange`). The gap is what the images are
worth to the model at that point of training; a run whose gap stays near 0 is training a language
model that ignores its input images, whatever its loss does.

The batch is drawn once, before training, from the stage's own data mixture through a separately
seeded stream (`train.seed` + `PROBE_SEED_OFFSET`), so it is the same batch at every probe and on
resume. It is not removed from the training stream: on a small corpus the model may also train on
its documents, which the two losses share, so the gap stays a fair comparison.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable

import numpy as np
import torch

from mm1.config import Config
from mm1.data.inputs import Inputs
from mm1.eval.shuffle import derange
from mm1.train.batches import ShardedLoader, to_device
from mm1.train.distributed import DistEnv, all_reduce_sum

PROBE_SEED_OFFSET = 104_729  # the probe stream's seed: train.seed + this (a prime, far from sweep seeds)


def crops_per_image(cfg: Config) -> int:
    """Crops the image pipeline makes of one image (sub-image grid + overview, or just the image)."""
    grid = int(cfg.model.subimage_grid)
    return grid * grid + 1 if grid else 1


def shuffled_images(batch: dict[str, torch.Tensor], image_id: int, crops: int, seed: int) -> torch.Tensor | None:
    """The batch's `images` with whole images (all their crops) deranged so that none stays in its own
    document; None when the batch has fewer than two documents with images (nothing to swap)."""
    images = batch.get("images")
    if images is None or images.shape[0] < 2 * crops:
        return None
    n_images = images.shape[0] // crops
    slots = (batch["input_ids"] == image_id).nonzero()  # [S, 2] (row, position), row-major = image order
    per_crop = slots.shape[0] // images.shape[0]
    first = slots[:: per_crop * crops][:n_images]  # the first slot of every image
    docs = [(int(b), int(batch["doc_ids"][b, t])) for b, t in first]
    try:
        donor = derange([[d] for d in docs], seed)
    except ValueError:
        return None
    order = torch.tensor([donor[u] * crops + c for u in range(n_images) for c in range(crops)])
    return images[order]


class ImageProbe:
    """One fixed batch per rank, scored with its own and with deranged images."""

    def __init__(self, cfg: Config, inputs: Inputs, env: DistEnv) -> None:
        probe_cfg = copy.deepcopy(cfg)
        probe_cfg.train.seed = cfg.train.seed + PROBE_SEED_OFFSET
        probe_cfg.data.num_workers = 0
        self.env, self.image_id, self.seed = env, cfg.model.image_token_id, probe_cfg.train.seed
        with _keep_rng():  # drawing the probe must not move the training run's random streams
            batch = next(ShardedLoader(probe_cfg, inputs, env.rank, env.world_size))
        self.batch = to_device({k: v for k, v in batch.items() if torch.is_tensor(v)}, env.device)
        self.shuffled = shuffled_images(self.batch, self.image_id, crops_per_image(cfg), self.seed)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> dict:
        """{"loss_probe", "loss_shuffled"} (mean per target token over all ranks); loss_shuffled is
        None when some rank's batch had nothing to derange (every rank still runs both forwards, so
        FSDP's collectives stay in step)."""
        was_training = model.training
        model.eval()
        sums = []
        try:
            for images in (self.batch.get("images"), self.shuffled):
                batch = dict(self.batch)
                if images is not None:
                    batch["images"] = images
                with autocast():
                    out = model(batch)
                sums += [out["loss_sum"].double(), (batch["targets"] != -100).sum().double()]
        finally:
            model.train(was_training)
        ok = torch.tensor(0.0 if self.shuffled is None else 1.0, dtype=torch.float64, device=self.env.device)
        total = all_reduce_sum(torch.stack([*sums, ok]), self.env)
        n_ranks = self.env.world_size
        probe = float(total[0] / total[1].clamp(min=1))
        shuffled = float(total[2] / total[3].clamp(min=1)) if int(total[4]) == n_ranks else None
        return {"loss_probe": probe, "loss_shuffled": shuffled}


@contextlib.contextmanager
def _keep_rng():
    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])
