"""Entry file of the logged pyfunc (MLflow "models from code"): no pickled Python objects."""

from mlflow.models import set_model

from bridge_assets.core.pyfunc import HousingPyfunc

set_model(HousingPyfunc())
