"""MLflow models-from-code definition of the divergence-risk predictor (no cloudpickle).

Logged by ``risk_model.tracking.log_training`` with the predictor bundle (JSON + XGBoost JSON) as
the artifact ``predictor``. Input: a DataFrame with one row per network (and learning rate): the
v3 feature columns (``lrmodel.FEATURE_GROUPS`` and the scale columns ``ln_d_model``,
``ln_n_layers``, ``ln_steps``, ``ln_batch_size``, ``ln_seq_len``, as ``serve.network_features``
builds them; a predictor saved before the sequence axis ignores ``ln_seq_len``) and
``lr``. Output: ``p_failed``, ``p_divergence``, ``risk``, ``max_safe_lr`` and ``recommended_lr``
per row, from ``serve.predict_table`` — the model call ``risk predict`` makes.
"""
from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class DivergenceRiskModel(PythonModel):
    def load_context(self, context):
        from risk_model.serve import load_bundle

        self.bundle = load_bundle(context.artifacts["predictor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from risk_model.serve import predict_table

        df = pd.DataFrame(model_input)
        out = predict_table(self.bundle, {c: df[c].to_numpy() for c in df.columns})
        return pd.DataFrame(out)


mlflow.models.set_model(DivergenceRiskModel())
