"""Felix-LM v2: a small, splice-native decoder LM trained from scratch on one GPU."""

__version__ = "0.1.0"
