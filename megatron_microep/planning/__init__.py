"""Pure planning code: numbers in, plans out. Nothing here imports torch.distributed or Megatron."""
