"""Novelty detectors behind one small interface, and the timm backbones they share."""
