"""The model-from-code file logged with every registered version (MLflow "models from code").

MLflow stores this file beside the weights and runs it to build the model when it loads a
version: it names the installed roadshift's ``RoadSignClassifier`` and nothing else, so the
artifact store holds no pickled object and no copy of the package. roadshift's own loader
(``roadshift.registry.safe_load``) runs it only when it is byte for byte this file.

Never import this module from roadshift's code: importing it sets MLflow's model-from-code slot.
"""

import mlflow

from roadshift.registry.pyfunc import RoadSignClassifier

mlflow.models.set_model(RoadSignClassifier())
