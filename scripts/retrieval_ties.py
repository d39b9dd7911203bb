"""Where ``limoe-eval`` and CLIP_benchmark count retrieval hits differently, and why: both on
the same features of a CSV's pairs, image-to-text R@K query by query, the queries whose match
ties with another caption (duplicate captions) apart.

    python scripts/retrieval_ties.py RUN_OR_CKPT data/openclipart/test.csv [K]

open_clip's metrics (``limoe-eval``) rank by ``argsort``, CLIP_benchmark by ``topk``; each
breaks a tie as its sort does, so they can disagree on tied queries only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
from torch.nn.functional import normalize

import limoe
from limoe.data.csv import read_csv
from limoe.data.images import open_image


@torch.no_grad()
def features(source: str, csv_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, _, preprocess = limoe.create_model_and_transforms(source)
    tokenizer = limoe.get_tokenizer(source)
    rows = read_csv(csv_path)
    images = torch.stack([preprocess(open_image(path)) for path, _ in rows])
    texts = tokenizer([caption for _, caption in rows])
    return normalize(model.encode_image(images), dim=-1), normalize(
        model.encode_text(texts), dim=-1
    )


def main(source: str, csv_path: str, k: int = 1) -> None:
    image, text = features(source, csv_path)
    scores = image @ text.T
    n = len(scores)
    order = torch.argsort(scores, dim=1, descending=True)
    ours = (order[:, :k] == torch.arange(n)[:, None]).any(1)  # open_clip's get_clip_metrics
    theirs = recall_at_k(scores, torch.eye(n, dtype=torch.bool), k) > 0
    tied = (scores == scores.diagonal()[:, None]).sum(1) > 1
    differ = ours != theirs
    print(f"{Path(csv_path).name}: {n} queries, {int(tied.sum())} tied with another caption")
    print(
        f"image-to-text R@{k}: limoe-eval {int(ours.sum())} hits, CLIP_benchmark {int(theirs.sum())}"
    )
    print(
        f"queries counted differently: {int(differ.sum())}, of them tied: {int((differ & tied).sum())}"
    )
    print(f"untied queries: limoe-eval {int(ours[~tied].sum())} hits, CLIP_benchmark "
          f"{int(theirs[~tied].sum())}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
