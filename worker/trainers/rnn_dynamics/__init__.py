"""Seed 004's dynamics analysis of trained `learning_rules` networks (bmcmahan2016/RNN_Learning_Rules).

The trainer is worker/trainers/learning_rules.py; `gridfleet analyze GRID` (cli/analyze.py) runs this
package over a grid's succeeded jobs. One topic per file, read in this order:
`network` (a trained network's one-step map, velocity and Jacobian, from its saved matrices),
`fixed_points` (fixed and slow points per constant input, deduplicated and classified by eigenvalues),
`geometry` (linear CKA, SVCCA, attractor-topology distances, how well distances group models by rule),
`plots` (PCA of trajectories with the fixed points, distance matrices, MDS and dendrograms),
`models` (a grid's result rows -> the trained networks, from the job's files or its final checkpoint),
`report` (all of it for a list of models: PNGs, summary.json, summary.csv and the table's rows).
"""
