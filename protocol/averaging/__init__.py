"""The averaging layer: how peers combine tensors.

  mean.py   weighted means of tensor lists (fp32, order-deterministic)
"""
