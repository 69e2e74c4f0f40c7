"""Training strategies: plain tensor math plus a thin round driver."""
