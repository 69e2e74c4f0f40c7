"""The averaging layer: how peers combine tensors.

  butterfly.py       weighted butterfly all-reduce of one flat vector among a frozen group
  transaction.py     a round as a transaction: join, freeze a group, all-reduce, vote, commit
  star.py            peers push tensor lists to one center (sync, gradcode): gather rounds, push, receive
  pairwise.py        two peers swap tensor lists for a round (noloco)
  state_transfer.py  hand a replica (weights, optimizer, strategy state) to a peer that needs it
  mean.py            weighted means of tensor lists (fp32, order-deterministic)
  robust.py          robust combination (norm clipping, trimmed mean) and the per-peer suspicion ledger
  deadlines.py       every wait of an exchange, derived from `round_timeout_s`
"""
