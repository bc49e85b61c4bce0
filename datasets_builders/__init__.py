"""Dataset builders: real annotation formats -> dataset index -> split manifests."""

BUILDER_VERSION = "1"
