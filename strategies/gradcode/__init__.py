"""`gradcode`: synchronous data parallel that never waits for up to s stragglers.

  codes.py       gradient codes (fractional repetition, cyclic): encode, decode from any n - s
  round.py       the aggregator's book of coded steps: plans, replies, decodes, stragglers
  strategy.py    GradientCodingStrategy: every peer's loop and the aggregator's handlers
  sequential.py  sequential gradient coding: a simulation (bench and tests), not used live
  options.py     the strategy's settings (the code, straggler injection)
"""
