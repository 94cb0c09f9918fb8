"""The image-shuffled control: how much of a score comes from looking at the query's image.

A few-shot number can beat the blind baseline through the demonstrations' answer distribution or
the question alone. Scoring the *same* prompts again with each query's image(s) swapped for another
test item's tells the two apart: `image_gain = score - score_shuffled` is what the query's own image
is worth. The swap is a seeded derangement over the test items with images: no query keeps its own
image (items that share an image, e.g. several questions about one picture, never swap with each
other), multi-image queries get all of another item's images, and the demonstrations are left
exactly as in the real run (same examples, same images) so the query's image is the only change.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Hashable, Sequence

from mm1.eval.tasks import Example


def derange(keys: Sequence[Collection[Hashable]], seed: int | str) -> list[int]:
    """donor[i]: the index whose images position i is shown; never i, never one sharing a key (an
    image, or the sample it belongs to) with i. Reproducible from `seed` alone (string seeds hash
    with SHA-512).

    A uniform shuffle, then each clash is repaired by swapping donors with another position where
    both sides become clash-free (in a seeded random order), so the result is a derangement for any
    n >= 2 that allows one. Raises ValueError when none exists (one item, or one key shared by more
    than half of them)."""
    n = len(keys)
    if n < 2:
        raise ValueError(f"the image-shuffled control needs at least 2 items with images, got {n}")
    sets = [set(k) for k in keys]

    def clash(i: int, j: int) -> bool:
        return i == j or bool(sets[i] & sets[j])

    rng = random.Random(seed)
    donor = list(range(n))
    rng.shuffle(donor)
    for i in range(n):
        if not clash(i, donor[i]):
            continue
        others = list(range(n))
        rng.shuffle(others)
        for j in others:
            if not clash(i, donor[j]) and not clash(j, donor[i]):
                donor[i], donor[j] = donor[j], donor[i]
                break
        else:
            raise ValueError(
                f"no image derangement exists for item {i} (keys {sorted(map(str, sets[i]))[:3]}): "
                "its image is shared by too many of the items"
            )
    return donor


def shuffled_donors(items: Sequence[Example], seed: int, task: str) -> tuple[list[Example | None] | None, str]:
    """Per query, the item whose images replace its own (None for a query without images), and a
    note. Returns (None, why) when the control does not apply: no item has an image (a text-only
    task: there is nothing to shuffle, so no score_shuffled is reported rather than a fake one),
    fewer than two do, or their images overlap so much that no query can be given a foreign one."""
    with_images = [i for i, ex in enumerate(items) if ex.images]
    if not with_images:
        return None, "text-only task: no image to shuffle"
    if len(with_images) < 2:
        return None, "only one test item has an image: nothing to swap it with"
    sub = [items[i] for i in with_images]
    try:
        perm = derange([ex.image_keys for ex in sub], f"{seed}/shuffle/{task}")
    except ValueError as e:  # reported in the result (score_shuffled null) rather than failing the eval
        return None, f"no derangement: {e}; raise eval.limit or set eval.shuffled_control=false"
    donors: list[Example | None] = [None] * len(items)
    for k, i in enumerate(with_images):
        donors[i] = sub[perm[k]]
    return donors, "each query shown another test item's image(s) (seeded derangement); demonstrations unchanged"
