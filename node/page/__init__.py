"""The node's page: what a contributor sees at `GET /` on the node's HTTP address.

  state.py     PageState, the JSON the page polls (`/page.json`): node, peers, charts, panel, warnings
  history.py   PageHistory: bounded in-memory samples of rates and round outcomes over time
  warnings.py  the warnings in words (isolated, waiting, spec mismatch, aborts, suspects, disk)
  book.py      PageBook: fed from the event loop, read by the HTTP threads
  static/      index.html, page.js and page.css: self-contained, charts drawn as SVG, read-only
"""
