"""Local training on one device: what a peer computes between exchanges.

  model.py    the built-in byte-level GPT (GPTConfig, GPT)
  models.py   --model: the built-in GPT, a local Hugging Face causal LM, or a factory, behind one interface
  data.py     byte corpora and batch sampling (ByteDataset)
  tokens.py   training text as token ids for a model with its own tokenizer (cached)
  trainer.py  LocalTrainer: gradients, optimizer steps, evaluation, checkpoints, param hash
  device.py   device choice, memory caps, spare-GPU mode
"""
