"""Local training on one device: what a peer computes between exchanges.

  model.py    the built-in byte-level GPT (GPTConfig, GPT)
  data.py     byte corpora and batch sampling (ByteDataset)
  trainer.py  LocalTrainer: gradients, optimizer steps, evaluation, checkpoints, param hash
  device.py   device choice, memory caps, spare-GPU mode
"""
