"""MLflow models-from-code definition of the divergence-risk predictor (no cloudpickle).

Logged by ``risk_model.tracking.log_training`` with the predictor directory (JSON + XGBoost JSON) as
the artifact ``predictor``. Input: a DataFrame of runs with the profile aggregates and, for the
config-aware predictor, ``lr`` (+ ``optimizer``, ``warmup``, ``batch_size``, ``steps``,
``d_model``; missing config columns take the training corpus's defaults). Output: a DataFrame with
``p_divergence`` and ``risk`` per row.
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
        from risk_model.serve import risk_band

        df = pd.DataFrame(model_input).copy()
        if "lr" in df and self.bundle.config_aware is not None:
            pred = self.bundle.config_aware
            for k, v in pred.metadata_.get("config_defaults", {}).items():
                if k not in df:
                    df[k] = v
            if "optimizer" not in df:
                df["optimizer"] = "adamw"
        else:
            pred = self.bundle.config_free
        p = pred.predict_proba(df)[:, 1]
        return pd.DataFrame({"p_divergence": p, "risk": [risk_band(x) for x in p]})


mlflow.models.set_model(DivergenceRiskModel())
