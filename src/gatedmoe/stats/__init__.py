"""Classical mixture of experts by maximum likelihood (EM), as scikit-learn estimators.

>>> from gatedmoe.stats import MoERegressor, MoEClassifier, voronoi_loss, simulate
"""

from gatedmoe.stats.classifier import MoEClassifier
from gatedmoe.stats.gating import GATES
from gatedmoe.stats.regressor import MoERegressor
from gatedmoe.stats.selection import L1Path, Selection, l1_path, select_n_experts
from gatedmoe.stats.simulate import SimulationResult, simulate
from gatedmoe.stats.truth import MoETruth
from gatedmoe.stats.voronoi import VoronoiLoss, voronoi_loss

__all__ = ["GATES", "MoERegressor", "MoEClassifier", "MoETruth", "VoronoiLoss", "voronoi_loss",
           "simulate", "SimulationResult", "select_n_experts", "Selection", "l1_path", "L1Path"]
