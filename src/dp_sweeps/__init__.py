"""dp_sweeps: Hydra-configured sweeps of differentially private image classification."""

__version__ = "0.1.0"
