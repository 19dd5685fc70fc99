"""Stacked denoising autoencoders (Vincent et al., ICML 2008) in PyTorch.

A plain library: it knows nothing of DVC or MLflow. The pipeline in ``stages/`` drives it.
"""

from sda.dae import DenoisingAutoencoder, reconstruction_cross_entropy
from sda.noise import MaskingNoise
from sda.stacked import StackedClassifier

__all__ = ["DenoisingAutoencoder", "MaskingNoise", "StackedClassifier", "reconstruction_cross_entropy"]
