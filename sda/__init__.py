"""Stacked denoising autoencoders (Vincent et al., ICML 2008) in PyTorch.

A plain library: it knows nothing of DVC or MLflow. The pipeline in ``stages/`` drives it.
"""

from sda.dae import DenoisingAutoencoder, Emphasis, reconstruction_cross_entropy
from sda.noise import GaussianNoise, MaskingNoise, SaltPepperNoise
from sda.stacked import StackedClassifier

__all__ = ["DenoisingAutoencoder", "Emphasis", "GaussianNoise", "MaskingNoise", "SaltPepperNoise", "StackedClassifier",
           "reconstruction_cross_entropy"]
