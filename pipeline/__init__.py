"""rcg-pipeline: the reusable parts of a staged, cached RCG (Representation-Conditioned Generation)."""

__version__ = "0.1.0"
