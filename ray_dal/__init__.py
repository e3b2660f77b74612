"""ray_dal: distributed dynamic active learning (training-dynamics scores) on Ray."""

__version__ = "0.1.0"
