"""The app's models, in plain torch: the MNIST-1D CNN and the paper's CIFAR networks."""

from lightning_sam.models.classifier import Classifier, SAMClassifier
from lightning_sam.models.nets import ConvNet1D, ResNet18, WideResNet

__all__ = ["Classifier", "ConvNet1D", "ResNet18", "SAMClassifier", "WideResNet"]
