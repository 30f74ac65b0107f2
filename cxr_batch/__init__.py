"""cxr-batch: batch triage of frontal chest radiographs with a DenseNet-121 + FPN fusion model."""

__version__ = "0.1.0"
