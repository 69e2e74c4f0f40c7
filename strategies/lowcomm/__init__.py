"""The low-communication family: local steps, then an exchange of pseudo-gradients.

  outer_math.py  pure tensor math: pseudo-gradients, outer Nesterov, fragment merges, NoLoCo pairs
  diloco.py      `diloco`: H local steps, then one transactional all-reduce round on φ
  streaming.py   `streaming-diloco`: φ synced in P staggered fragments, overlapped with local steps
  noloco.py      `noloco`: each round a peer averages with one random partner (no all-reduce)
  options.py     the family's settings (H, outer optimizer, fragments, ...)
  panel.py       what the node's page shows: outer rounds and φ agreement, or pair rounds
"""
