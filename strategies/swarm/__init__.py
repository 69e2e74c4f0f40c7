"""`swarm`: SWARM pipeline parallelism over real peers, with CheckFree stage recovery.

  strategy.py   SwarmStrategy: stage records, placement, the trainer's micro-batch driver, the stage server
  stage.py      StageWorker: one replica of one stage (forward, backward, optimizer)
  staging.py    what stages are cut from: the built-in GPT or a Hugging Face GPT-2 / Llama
  router.py     StageRouter: pick the peer of a stage that should finish a task soonest
  rebalance.py  who serves which stage: start choice, the CheckFree mover, rebalancing
  checkfree.py  rebuild a stage that lost every replica from its neighbours (CheckFree / CheckFree+)
  wire.py       pipeline messages <-> tensors; the per-stage DHT record
  metrics.py    the strategy's own Prometheus series
  options.py    the strategy's settings (pipeline shape, placement, CheckFree, fault injection)
"""
