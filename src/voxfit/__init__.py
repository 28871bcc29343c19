"""voxfit: hardware-aware compression search for personalizable speech acoustic models."""

__version__ = "0.1.0"
