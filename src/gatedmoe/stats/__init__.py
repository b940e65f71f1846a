"""Classical mixture of experts by maximum likelihood (EM), as scikit-learn estimators.

>>> from gatedmoe.stats import MoERegressor, MoEClassifier, voronoi_loss, simulate
"""

from gatedmoe.stats.classifier import MoEClassifier
from gatedmoe.stats.gating import GATES
from gatedmoe.stats.regressor import MoERegressor

__all__ = ["GATES", "MoERegressor", "MoEClassifier"]
