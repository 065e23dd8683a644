"""Task tuning (PFTT and its contenders, paper IV-D): an encoder with shared adapters and private LoRA on AG News."""
