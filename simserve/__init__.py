"""simserve: Siamese image similarity as a service.

The runtime package (everything here but ``simserve.model``) needs neither
torch nor torchvision: it serves exported ONNX bundles. ``simserve.model``
holds the torch definition used by training, export and the reference
backend.
"""

__version__ = "0.1.0"
