"""Synthetic corpora with the real corpus schema, for unit tests of corpus/predictor/evaluate.

Divergence is drawn from a known logistic law in the layer-mean M≈1 and log10 lr, so tests can
check that predictors recover the law's ordering. Not a model of real training.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from featurize.profile import PROFILE_COLUMNS

NORM_NEAR = {"pre_ln": 0.15, "post_ln": 0.3, "rmsnorm": 0.2, "none": 0.6}


def true_logit(m_near_mean, lr):
    return 12.0 * (np.asarray(m_near_mean) - 0.35) + 3.0 * (np.log10(lr) + 2.5)


def make_corpus(n_configs: int = 60, seeds: int = 2, seed: int = 0, families=("gpt", "moe"),
                norms=tuple(NORM_NEAR)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, layers) tables with the corpus schema; labels from ``true_logit`` + Bernoulli noise."""
    rng = np.random.default_rng(seed)
    runs, layers = [], []
    for c in range(n_configs):
        family = families[c % len(families)]
        norm = norms[(c // len(families)) % len(norms)]
        L = int(rng.choice([2, 4]))
        d = int(rng.choice([32, 64]))
        lr = float(10 ** rng.uniform(-4, -1))
        warmup = int(rng.choice([0, 50]))
        opt = str(rng.choice(["adamw", "sgd"]))
        config_id = hashlib.sha1(f"{seed}-{c}".encode()).hexdigest()[:16]
        base = NORM_NEAR[norm] + rng.normal(0, 0.08)
        m_near_layers = np.clip(base + rng.normal(0, 0.03, L), 0.0, 1.0)  # the init profile: fixed per config
        for s in range(seeds):
            run_id = hashlib.sha1(f"{config_id}-{s}".encode()).hexdigest()[:16]
            p = 1 / (1 + np.exp(-true_logit(m_near_layers.mean(), lr)))
            div = int(rng.uniform() < p)
            runs.append(dict(
                run_id=run_id, config_id=config_id, family=family, norm=norm, d_model=d, n_layers=L,
                n_heads=4, init_scale=1.0, task="synthetic_lm", optimizer=opt, lr=lr, warmup=warmup,
                batch_size=16, steps=300, seed=s, kss_alpha=0.0, diverged=div,
                diverge_step=int(rng.integers(1, 300)) if div else -1, diverge_reason="loss" if div else "",
                collapsed=0, final_loss=float("nan") if div else 2.0,
                grad_norm_step1=float(rng.lognormal(0, 1) * (1 + div)), grad_norm_step100=float(rng.lognormal(0, 1)),
                grad_norm_var_1_100=float(rng.lognormal(0, 1)), loss_spikes_1_500=int(rng.poisson(1 + 2 * div)),
                seconds=1.0, versions="{}", profile_samples=256, profile_rank=16,
            ))
            for layer in range(L):
                mn = float(m_near_layers[layer])
                me = float(rng.uniform(0, 0.1))
                row = dict(run_id=run_id, layer=layer, name=f"blocks.{layer}", m_exp=me, m_near=mn,
                           m_mid=0.05, m_con=max(0.0, 1 - mn - me - 0.05), rho=1 + me + rng.normal(0, 0.01),
                           kappa_v=float(rng.lognormal(2, 1)), kreiss=float(rng.lognormal(0.5, 0.3)),
                           eta_nl=float(rng.uniform(0.1, 0.9)), reliable_fraction=float(rng.uniform(0.5, 1)),
                           degenerate=False, m_exp_all=me, m_near_all=mn, m_mid_all=0.05,
                           m_con_all=max(0.0, 1 - mn - me - 0.05), update_ratio=0.5, rank=16)
                layers.append(row)
    layers_df = pd.DataFrame(layers, columns=["run_id"] + PROFILE_COLUMNS)
    return pd.DataFrame(runs), layers_df


def write_corpus(path: Path, runs: pd.DataFrame, layers: pd.DataFrame | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    runs.to_parquet(path / "runs.parquet", index=False)
    if layers is not None:
        layers.to_parquet(path / "layers.parquet", index=False)
    return path
