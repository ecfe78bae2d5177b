"""A finished run as an MLflow pyfunc model: rows of the training columns in, predict.py's
prediction columns out (pred_label, pred_score, top1_label, top1_score, ...), through the same
`LoadedRun` as predict.py: the run's serializer, label map, max_length and blend, predict's
top_k and batch size.

MLflow loads this file by path ("models from code": the model holds no pickle), with lorasweep's
code in the model's code/ and the run's inference files as its artifact "run"
(lorasweep.tracking.mlflow_model logs all three). Bad input is a 400 from `mlflow models serve`
naming the column; the server goes on serving.
"""

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from lorasweep.config import PredictConfig
from lorasweep.errors import UserError
from lorasweep.tracking.mlflow_model import RUN_ARTIFACT


class ServedRun(PythonModel):
    def load_context(self, context):
        from lorasweep.runs.inference import LoadedRun  # torch: when the model loads

        self.run = LoadedRun.load(context.artifacts[RUN_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """`model_input`: MLflow has checked the signature's columns and types against it and
        dropped extra columns (a DataFrame hint: MLflow checks nothing more). No rows give none."""
        from lorasweep.runs.inference import check_input_columns

        try:
            check_input_columns(list(model_input.columns), self.run.settings, "request")
            return self.run.predict(model_input.to_dict(orient="list"),
                                    PredictConfig.batch_size, PredictConfig.top_k)
        except UserError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None


mlflow.models.set_model(ServedRun())
