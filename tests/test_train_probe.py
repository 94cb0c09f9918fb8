"""The training-time image probe: whole images (all their crops) are deranged across documents, no
image stays in its own document, and a batch with nothing to swap is reported as such."""

from __future__ import annotations

import torch

from mm1.train.probe import shuffled_images

IMG = 99


def _batch(docs_per_row: list[list[int]], crops: int, k: int = 2) -> dict[str, torch.Tensor]:
    """Rows of docs; doc d of row b holds `n` images of `crops` crops, each crop `k` slot tokens.
    Crop tensors are filled with a unique (image number * 10 + crop) so moves can be traced."""
    ids, doc_ids, images, image_no = [], [], [], 0
    for row in docs_per_row:
        r_ids, r_docs = [], []
        for d, n in enumerate(row):
            for _ in range(n):
                for c in range(crops):
                    images.append(torch.full((3, 2, 2), float(image_no * 10 + c)))
                    r_ids += [IMG] * k
                image_no += 1
            r_ids += [5, 6]
            r_docs += [d] * (len(r_ids) - len(r_docs))
        ids.append(r_ids)
        doc_ids.append(r_docs)
    width = max(len(r) for r in ids)
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    return {"input_ids": pad(ids, 0), "doc_ids": pad(doc_ids, -1), "images": torch.stack(images)}


def test_whole_images_move_to_another_document_and_the_result_is_seeded():
    crops = 5  # a 2x2 sub-image grid + overview
    batch = _batch([[2, 1], [1, 3]], crops)  # 7 images in 4 documents (two rows)
    owner = [(0, 0), (0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (1, 1)]
    out = shuffled_images(batch, IMG, crops, seed=3)
    assert out.shape == batch["images"].shape
    tags = out[:, 0, 0, 0].long().tolist()
    for u in range(7):
        src = tags[u * crops] // 10
        assert [t % 10 for t in tags[u * crops : (u + 1) * crops]] == list(range(crops))  # crops stay together
        assert all(t // 10 == src for t in tags[u * crops : (u + 1) * crops])
        assert owner[src] != owner[u]  # never an image of its own document
    assert torch.equal(out, shuffled_images(batch, IMG, crops, seed=3))
    assert sorted(tags) == sorted(batch["images"][:, 0, 0, 0].long().tolist())  # a permutation


def test_nothing_to_swap_gives_none():
    assert shuffled_images(_batch([[1]], 1), IMG, 1, seed=0) is None  # one image
    assert shuffled_images(_batch([[3]], 1), IMG, 1, seed=0) is None  # one document: no other to take from
    assert shuffled_images(_batch([[1], [1]], 1), IMG, 1, seed=0) is not None  # n = 2 swaps
