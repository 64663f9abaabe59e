"""A small ladder corpus for tests: a subset of the real corpus-v2 or corpus-v3 (real training outcomes), written
with its runs, layers and models tables so nothing has to be rebuilt."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

CORPUS = Path(__file__).resolve().parent.parent / "datasets" / "corpus-v2"
CORPUS_V3 = CORPUS.parent / "corpus-v3"


def write_ladder_subset(dst: Path, families=("gpt", "moe", "kan"), per_class: int = 12, seed: int = 0,
                        corpus: Path = CORPUS) -> Path:
    """``dst`` holding ``per_class`` networks (not dead at init) of each of ``families`` of ``corpus``."""
    models = pd.read_parquet(corpus / "models.parquet")
    models = models[~models["dead_at_init"] & models["family"].isin(families)]
    models = models.sample(frac=1.0, random_state=seed).groupby("family").head(per_class)
    keep = set(models["model_id"])
    dst.mkdir(parents=True, exist_ok=True)
    from risk_model.sweep.runner import write_parquet_atomic  # the sweep's own format (it refuses others)

    for name in ("runs", "layers", "models"):
        t = models if name == "models" else pd.read_parquet(corpus / f"{name}.parquet")
        write_parquet_atomic(t[t["model_id"].isin(keep)].reset_index(drop=True), dst / f"{name}.parquet", name)
    return dst
