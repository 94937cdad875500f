"""Training's library: what train.py's stages use beside the models and the data sets.

features (the frozen backbone features kept once, BAM's masked support maps), optimizer (SGD at
the poly learning rates), state (seeded generators, the frozen parts of the model), laps (phase
times), checks (the keys and targets of a training command).
"""
