"""Mask math, the ticket file and mask enforcement; may import utils/ and models.resnet, nothing above."""
