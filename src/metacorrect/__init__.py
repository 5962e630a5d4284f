"""metacorrect — train deep networks on noisily labelled data by Meta Loss Correction.

Convention used everywhere: a transition matrix ``T`` has ``T[i, j] = P(noisy = j | true = i)``
(rows = true classes, rows sum to 1).
"""

__version__ = "0.1.0"

from . import noise  # noqa: E402
from .data import load_dataset, make_problem  # noqa: E402
from .errors import find_label_errors  # noqa: E402
from .experiments import RunConfig, run_experiment  # noqa: E402
from .meta import MetaGradient  # noqa: E402
from .methods import create_method, method_names  # noqa: E402
from .models import create_model, model_names  # noqa: E402
from .train import FitResult, TensorBatchLoader, fit  # noqa: E402

__all__ = ["FitResult", "MetaGradient", "RunConfig", "TensorBatchLoader", "create_method", "create_model",
           "find_label_errors", "fit", "load_dataset", "make_problem", "method_names", "model_names", "noise",
           "run_experiment", "__version__"]
