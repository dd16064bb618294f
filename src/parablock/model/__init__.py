"""The model: loading, frozen weights, blocks, the forward and the training step, copy-on-write
blocks, and the LoRA adapter."""
