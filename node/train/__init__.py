"""Local training on one device: what a peer computes between exchanges.

  model.py    the built-in byte-level GPT (GPTConfig, GPT)
  hf_stages.py  a Hugging Face GPT-2 / Llama split into pipeline stages (HFPipelineStage)
  models.py   --model: the built-in GPT, a local Hugging Face causal LM, or a factory, behind one interface
  data.py     corpora (text, record files) and their windows (ByteDataset)
  sources.py  text out of .jsonl / .parquet / .arrow records
  shards.py   pre-tokenized .bin / .npy token shards, memory-mapped and checked
  sampler.py  which windows a data shard trains on at a step, and which are held out
  tokens.py   training data as token ids for a model with its own tokenizer (cached)
  trainer.py  LocalTrainer: gradients, optimizer steps, evaluation, checkpoints, param hash
  precision.py  autocast dtypes (fp32, bf16, fp16) and the fp16 loss scale
  device.py   device choice, memory caps, spare-GPU mode
  export.py   `swarm-node export`: the trained model as a Hugging Face directory or safetensors
"""
