"""The named weight sources a `weights` setting may give instead of a file (plain strings, so
the command line can check them without importing torch)."""

HUB = "hub"  # the timm hub's pretrained weights for the backbone name
NO_WEIGHTS = "none"  # random initialisation, on request only
EMBEDDED_WEIGHTS = "embedded"  # pre-trained by ndbench on the embedded dataset (shipped or cached)
