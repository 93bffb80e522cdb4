"""Seed 000 (iterativenn): sparse block-matrix RNNs, their baselines, and their data sources.

The trainer lives in worker/trainers/sparse_rnn.py; this package holds its parts, one topic per file:
`data` (the SequenceData every source returns), `blocks` (block descriptions and the BlockRNN),
`baselines` (LSTM/GRU/RNN/MLP in the same [x, h, y] frame), `anomaly` (RandomAnomaly),
`minari_data` and `scoring` (Minari behaviour cloning and env reward), `sampling` (parameter budgets).
"""
