"""nlplatform: a PyTorch Lightning experiment platform for Nested Learning.

Importing the package does no work: models, data and training are imported lazily by the commands that use them.
"""

__version__ = "0.1.0"
