"""Risk callbacks with the real libraries: a tiny random-init GPT-2 trained by a real
``transformers.Trainer`` (CPU, no downloads), a tiny Lightning module by a real Lightning
``Trainer``, and a real MLflow run in a temporary sqlite store."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from risk_model.monitor import HISTORY_COLUMNS, DivergenceRiskError  # noqa: E402

MAX_STEPS, EVERY = 4, 2
SAFE_LR, RISKY_LR = 1e-3, 10.0  # P(divergence) of the tiny GPT-2: ≈ 0.01 at 1e-3, ≥ 0.3 at 10
THRESHOLD = 0.2


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=64, T=16, vocab=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, vocab, (n, T), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.fixture(autouse=True)
def _no_shadowed_datasets(monkeypatch):
    """This repository's ``datasets/`` folder (the corpora) is a namespace package ``datasets``
    when the tests run from its root (``python -m pytest`` puts the cwd on sys.path); transformers
    then takes it for Hugging Face ``datasets`` and fails on ``datasets.Dataset``."""
    import transformers.trainer as hf_trainer_module

    shadow = getattr(hf_trainer_module, "datasets", None)
    if shadow is not None and getattr(shadow, "__file__", None) is None:
        monkeypatch.setattr(hf_trainer_module, "is_datasets_available", lambda: False)


def hf_trainer(tmp_path, model, lr, report_to="none", **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=MAX_STEPS, learning_rate=lr, per_device_train_batch_size=4,
        warmup_steps=1, lr_scheduler_type="constant_with_warmup", logging_steps=1, save_strategy="no", report_to=report_to, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData())


def risk_rows(log_history, key="risk/p_divergence"):
    return [h for h in log_history if key in h]


def test_importing_risk_model_needs_no_integration():
    code = ("import sys, risk_model, risk_model.monitor, risk_model.callbacks; "
            "bad = [m for m in ('transformers', 'lightning', 'mlflow', 'wandb') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_arguments_fail_at_construction():
    from risk_model.callbacks import RiskCallback

    with pytest.raises(ValueError, match="action"):
        RiskCallback(action="halt")
    with pytest.raises(ValueError, match="every"):
        RiskCallback(every=0)
    for bad in (0.0, -1.0, float("nan"), "3.2"):
        with pytest.raises(ValueError, match="marginal_loss"):
            RiskCallback(marginal_loss=bad)


def test_hf_warn_trains_and_logs_history(tmp_path, caplog):
    from risk_model.callbacks import RiskCallback

    trainer = hf_trainer(tmp_path, tiny_gpt2(), RISKY_LR)
    cb = RiskCallback(action="warn", threshold=THRESHOLD, every=EVERY, n_samples=64).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="risk_model.callbacks"):
        trainer.train()
    assert trainer.state.global_step == MAX_STEPS  # warn never stops
    assert any("HIGH RISK" in r.getMessage() for r in caplog.records)
    # pre-flight through trainer.log at step 0, then one row per EVERY steps
    pre = risk_rows(trainer.state.log_history, "risk/preflight_p_divergence")
    assert [h["step"] for h in pre] == [0]
    assert pre[0]["risk/preflight_p_divergence"] == pytest.approx(cb.assessment_["predictions"][0]["p_divergence"])
    assert [h["step"] for h in risk_rows(trainer.state.log_history)] == [2, 4]
    hist = cb.history
    assert list(hist.columns) == HISTORY_COLUMNS
    assert hist["step"].tolist() == [2, 4] and (hist["error"] == "").all()
    assert hist["p_divergence"].between(0, 1).all() and (hist["lr"] > 0).all()


def test_hf_stop_raises_before_the_first_optimizer_step(tmp_path):
    from risk_model.callbacks import RiskCallback

    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = hf_trainer(tmp_path, model, RISKY_LR)
    RiskCallback(action="stop", threshold=THRESHOLD, every=EVERY, n_samples=64).attach(trainer)
    with pytest.raises(DivergenceRiskError, match="before the first optimizer step") as info:
        trainer.train()
    assert trainer.state.global_step == 0
    assert len(trainer.optimizer.state) == 0  # AdamW keeps per-parameter state from its first step on
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert info.value.assessment["predictions"][0]["p_failed"] >= THRESHOLD
    assert "lr 10" in str(info.value)


def test_hf_stop_lets_a_safe_run_train(tmp_path):
    from risk_model.callbacks import RiskCallback

    trainer = hf_trainer(tmp_path, tiny_gpt2(), SAFE_LR)
    cb = RiskCallback(action="stop", threshold=THRESHOLD, every=EVERY, n_samples=64)
    trainer.add_callback(cb)  # not attached: checks and records, metrics not in log_history
    trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert cb.history["step"].tolist() == [2, 4]
    assert not risk_rows(trainer.state.log_history)


def test_hf_model_without_blocks_trains_on(tmp_path, caplog):
    from risk_model.callbacks import RiskCallback

    class Flat(nn.Module):  # no residual-block container to discover
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 8)
            self.out = nn.Linear(8, 64)

        def forward(self, input_ids, labels=None):
            logits = self.out(self.emb(input_ids))
            return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}

    trainer = hf_trainer(tmp_path, Flat(), SAFE_LR)
    cb = RiskCallback(action="stop", every=1, n_samples=64).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="risk_model"):
        trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    said = [r.getMessage() for r in caplog.records if r.name.startswith("risk_model")]
    assert len(said) == 1 and "cannot check this model" in said[0]
    assert cb.monitor is None and cb.history.empty


@pytest.mark.slow
def test_hf_metrics_reach_an_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from risk_model.callbacks import RiskCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the store's default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "risk-callback-test")
    trainer = hf_trainer(tmp_path, tiny_gpt2(), SAFE_LR, report_to=["mlflow"])
    cb = RiskCallback(action="warn", threshold=THRESHOLD, every=EVERY, n_samples=64).attach(trainer)
    trainer.train()  # on_train_end ends the run, which flushes MLflow's asynchronous logging

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("risk-callback-test")
    (run,) = client.search_runs([exp.experiment_id])
    pre = client.get_metric_history(run.info.run_id, "risk/preflight_p_divergence")
    assert [(m.step, m.value) for m in pre] == [(0, pytest.approx(cb.assessment_["predictions"][0]["p_divergence"]))]
    hist = client.get_metric_history(run.info.run_id, "risk/p_divergence")
    assert sorted(m.step for m in hist) == [2, 4]
    assert sorted(m.value for m in hist) == pytest.approx(sorted(cb.history["p_divergence"]))
    for key in ("risk/m_near_mean", "risk/rho_max", "risk/kreiss_max", "risk/update_ratio_mean"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key


# ==================================================================== Lightning
def lightning_module(lr):
    L = pytest.importorskip("lightning")

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_gpt2()

        def forward(self, input_ids):
            return self.net(input_ids=input_ids).logits

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(TokenData(), batch_size=4)

    return L, TinyLM()


def lightning_trainer(L, tmp_path, cb):
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(max_steps=MAX_STEPS, accelerator="cpu", devices=1, callbacks=[cb],
                     logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)


def test_lightning_warn_trains_and_logs_history(tmp_path):
    import pandas as pd

    from risk_model.callbacks import LightningRiskCallback

    L, module = lightning_module(RISKY_LR)
    cb = LightningRiskCallback(action="warn", threshold=THRESHOLD, every=EVERY, n_samples=64, warmup=0,
                               batch_size=4)
    trainer = lightning_trainer(L, tmp_path, cb)
    trainer.fit(module)
    assert trainer.global_step == MAX_STEPS
    assert cb.history["step"].tolist() == [2, 4] and (cb.history["error"] == "").all()
    assert cb.monitor.assumptions_ == []
    logged = pd.read_csv(trainer.logger.log_dir + "/metrics.csv")
    assert logged.dropna(subset=["risk/preflight_p_divergence"])["step"].tolist() == [0]
    rows = logged.dropna(subset=["risk/p_divergence"])
    assert rows["step"].tolist() == [2, 4]
    assert rows["risk/p_divergence"].tolist() == pytest.approx(cb.history["p_divergence"].tolist())


def test_lightning_stop_raises_before_the_first_optimizer_step(tmp_path):
    from risk_model.callbacks import LightningRiskCallback

    L, module = lightning_module(RISKY_LR)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = LightningRiskCallback(action="stop", threshold=THRESHOLD, every=EVERY, n_samples=64)
    trainer = lightning_trainer(L, tmp_path, cb)
    with pytest.raises(DivergenceRiskError, match="before the first optimizer step"):
        trainer.fit(module)
    assert trainer.global_step == 0
    assert len(trainer.optimizers[0].state) == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert any("warmup not given" in a for a in cb.monitor.assumptions_)


# ==================================================================== stopping a failing run
FAIL_STEPS = 40
BLOWUP_LR, GOOD_LR = 30.0, 3e-3


class CountingData(torch.utils.data.Dataset):
    """Learnable tokens: each sequence counts up from a random start (mod vocab)."""

    def __init__(self, n=64, T=16, vocab=64):
        g = torch.Generator().manual_seed(2)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.x = (start + torch.arange(T)) % vocab

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def hf_failure_trainer(tmp_path, lr, **kw):
    kw = dict(dict(max_grad_norm=1.0, save_strategy="no", report_to="none"), **kw)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=FAIL_STEPS, learning_rate=lr, per_device_train_batch_size=8,
        lr_scheduler_type="constant", logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        **kw)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=CountingData())


def test_hf_stop_ends_a_failing_run_early_with_the_reason(tmp_path, caplog):
    from risk_model.callbacks import RiskCallback
    from risk_model.detector import REASON_CODES

    trainer = hf_failure_trainer(tmp_path, BLOWUP_LR, save_strategy="steps", save_steps=2)
    cb = RiskCallback(action="stop", spectral=False).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="risk_model"):
        trainer.train()
    stop = trainer.state.global_step
    assert stop < FAIL_STEPS / 2  # stopped early
    assert cb.verdict.failing and cb.verdict.step == stop
    said = [r.getMessage() for r in caplog.records if r.name.startswith("risk_model")]
    assert len(said) == 1 and "stopping training" in said[0] and cb.verdict.reason in said[0]
    rows = risk_rows(trainer.state.log_history, "risk/failing")
    assert [h["risk/failing"] for h in rows] == [0.0] * (len(rows) - 1) + [1.0]
    assert rows[-1]["step"] == stop and rows[-1]["risk/reason"] == REASON_CODES[cb.verdict.reason]
    # the Trainer's own checkpoints, none after the stop
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved and max(saved) <= stop


def test_hf_stop_lets_a_learning_run_train(tmp_path):
    from risk_model.callbacks import RiskCallback

    trainer = hf_failure_trainer(tmp_path, GOOD_LR)
    cb = RiskCallback(action="stop", spectral=False).attach(trainer)
    trainer.train()
    assert trainer.state.global_step == FAIL_STEPS
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]  # it learned
    rows = risk_rows(trainer.state.log_history, "risk/p_failed")
    assert len(rows) == FAIL_STEPS and not any(h["risk/failing"] for h in rows)
    assert not cb.verdict.failing


def test_hf_logs_without_grad_norm_are_named_once_and_nothing_else(tmp_path, caplog):
    from risk_model.callbacks import RiskCallback

    class QuietTrainer(transformers.Trainer):
        """A Trainer whose training logs leave out the gradient norm."""

        def log(self, logs, *args, **kwargs):
            logs.pop("grad_norm", None)
            super().log(logs, *args, **kwargs)

    trainer = hf_failure_trainer(tmp_path, BLOWUP_LR)
    trainer = QuietTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset)
    cb = RiskCallback(action="stop", spectral=False).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="risk_model"):
        trainer.train()
    assert trainer.state.global_step == FAIL_STEPS  # nothing stopped
    said = [r.getMessage() for r in caplog.records if r.name.startswith("risk_model")]
    assert len(said) == 1 and "'grad_norm'" in said[0]
    assert not risk_rows(trainer.state.log_history, "risk/failing") and cb.verdict is None


def test_stop_where_the_framework_cannot_stop_fails_at_attach():
    L = pytest.importorskip("lightning")
    from risk_model.callbacks import RiskCallback
    from risk_model.errors import UsageError

    with pytest.raises(UsageError, match="action='stop' needs a transformers.Trainer"):
        RiskCallback(action="stop").attach(L.Trainer(accelerator="cpu", logger=False))


@pytest.mark.slow
def test_hf_failure_metrics_reach_an_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from risk_model.callbacks import RiskCallback
    from risk_model.detector import REASON_CODES

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "risk-failure-test")
    trainer = hf_failure_trainer(tmp_path, BLOWUP_LR, report_to=["mlflow"])
    cb = RiskCallback(action="stop", spectral=False).attach(trainer)
    trainer.train()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("risk-failure-test").experiment_id])
    failing = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "risk/failing"))
    assert failing[-1] == (cb.verdict.step, 1.0) and all(v == 0.0 for _, v in failing[:-1])
    (reason,) = [m for m in client.get_metric_history(run.info.run_id, "risk/reason") if m.step == cb.verdict.step]
    assert reason.value == REASON_CODES[cb.verdict.reason]
    assert len(client.get_metric_history(run.info.run_id, "risk/p_failed")) == len(failing)


def lightning_counting_module(lr, clip_free=True):
    L = pytest.importorskip("lightning")

    class CountLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_gpt2()

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(CountingData(), batch_size=8)

    return L, CountLM()


def lightning_failure_trainer(L, tmp_path, cb):
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(max_steps=FAIL_STEPS, accelerator="cpu", devices=1, callbacks=[cb],
                     logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False, gradient_clip_val=1.0,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)


@pytest.mark.parametrize("lr, stops", [(BLOWUP_LR, True), (GOOD_LR, False)])
def test_lightning_stop_ends_only_a_failing_run(tmp_path, caplog, lr, stops):
    import pandas as pd

    from risk_model.callbacks import LightningRiskCallback

    L, module = lightning_counting_module(lr)
    cb = LightningRiskCallback(action="stop", spectral=False, detect_every=2)
    trainer = lightning_failure_trainer(L, tmp_path, cb)
    with caplog.at_level(logging.WARNING, logger="risk_model"):
        trainer.fit(module)
    logged = pd.read_csv(trainer.logger.log_dir + "/metrics.csv").dropna(subset=["risk/failing"])
    assert logged["step"].tolist() == list(range(2, trainer.global_step + 1, 2))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("risk_model")]
    if stops:
        assert trainer.global_step < FAIL_STEPS / 2 and cb.verdict.failing and cb.verdict.step == trainer.global_step
        assert len(said) == 1 and "stopping training" in said[0] and cb.verdict.reason in said[0]
        assert logged["risk/failing"].tolist()[-1] == 1.0
    else:
        assert trainer.global_step == FAIL_STEPS and not cb.verdict.failing and said == []
        assert not logged["risk/failing"].any()


def test_hf_sweep_stops_a_run_far_behind_its_sibling(tmp_path, caplog):
    """Two runs of one LR sweep through one ``LadderWatch``: the run at 0.08 learns slowly (the
    single-run detector lets it go on) while its sibling at 0.03 learns fast; it stops where the sibling rule, applied by hand to the
    two runs' logged losses, says."""
    from risk_model.callbacks import RiskCallback
    from risk_model.detector import marginal_loss
    from risk_model.ladder_watch import REASON, LadderRule, LadderWatch

    R = marginal_loss(CountingData().x.reshape(-1), 64)
    rule = LadderRule(theta=0.3, fmin=0.2, persist=0.05, min_gap=0.1, smooth_points=3, every=10, min_points=3)
    watch = LadderWatch(R, rule)
    good = hf_failure_trainer(tmp_path / "a", 0.03)
    RiskCallback(action="stop", spectral=False, ladder=watch).attach(good)
    good.train()
    assert good.state.global_step == FAIL_STEPS
    bad = hf_failure_trainer(tmp_path / "b", 0.08)
    cb = RiskCallback(action="stop", spectral=False, ladder=watch).attach(bad)
    with caplog.at_level(logging.WARNING, logger="risk_model"):
        bad.train()

    def smoothed(history):  # the recorded points (steps 1, 11, 21, ...), trailing mean of 3
        pts = [h["loss"] for h in history if "loss" in h and (h["step"] - 1) % 10 == 0]
        return [sum(pts[max(0, i - 2): i + 1]) / len(pts[max(0, i - 2): i + 1]) for i in range(len(pts))]

    sa, sb = smoothed(good.state.log_history), smoothed(bad.state.log_history)
    run, expect = 0, None
    for i, step in enumerate(range(1, FAIL_STEPS + 1, 10)):
        b = min(sa[i], sb[i]) if i < len(sb) else sa[i]
        behind = i < len(sb) and sb[i] > b + 0.3 * (R - b) and step >= 0.2 * FAIL_STEPS and b <= 0.9 * R
        run = run + 1 if behind else 0
        if run >= 3:
            expect = step
            break
    assert expect is not None and expect < FAIL_STEPS
    assert bad.state.global_step == expect and cb.verdict.failing and cb.verdict.reason == REASON
    said = [r.getMessage() for r in caplog.records if r.name.startswith("risk_model")]
    assert len(said) == 1 and "stopping training" in said[0] and REASON in said[0]
    rows = risk_rows(bad.state.log_history, "risk/failing")
    from risk_model.detector import REASON_CODES

    assert rows[-1]["risk/failing"] == 1.0 and rows[-1]["risk/reason"] == REASON_CODES[REASON]


def test_a_ladder_that_is_not_a_ladder_watch_fails_at_construction():
    from risk_model.callbacks import RiskCallback

    with pytest.raises(TypeError, match="LadderWatch"):
        RiskCallback(ladder={"lr": 1e-3})


def test_lightning_sweep_stops_only_the_run_behind_its_sibling(tmp_path):
    """The sibling rule through real Lightning Trainers (the LR read from the optimizer): of two
    runs sharing a ``LadderWatch``, the one at 0.03 trains to the end, the slower one at 0.08 stops."""
    from risk_model.callbacks import LightningRiskCallback
    from risk_model.detector import marginal_loss
    from risk_model.ladder_watch import REASON, LadderRule, LadderWatch

    R = marginal_loss(CountingData().x.reshape(-1), 64)
    watch = LadderWatch(R, LadderRule(theta=0.3, fmin=0.2, persist=0.05, min_gap=0.1))
    out = {}
    for lr in (0.03, 0.08):
        L, module = lightning_counting_module(lr)
        cb = LightningRiskCallback(action="stop", spectral=False, detect_every=10, ladder=watch)
        trainer = lightning_failure_trainer(L, tmp_path / str(lr), cb)
        trainer.fit(module)
        out[lr] = (trainer.global_step, cb.verdict)
    assert out[0.03][0] == FAIL_STEPS and not out[0.03][1].failing
    step, v = out[0.08]
    assert v.failing and v.reason == REASON and step == v.step == 30   # points 10, 20, 30 behind
    assert [r.lr for r in watch.runs] == [0.03, 0.08]
