"""zenith-merge: fuse pretrained Mixture-of-Experts checkpoints into one standard MoE checkpoint."""

__version__ = "0.1.0"
