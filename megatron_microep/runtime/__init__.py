"""Runtime mechanics that run inside a training step (torch, torch.distributed)."""
