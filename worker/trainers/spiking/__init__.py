"""Seed 002 (SNN-DDQN): the parts of the spiking Double DQN trainer beside worker/trainers/snn_ddqn.py.

The trainer file stays the entry point; this package holds one topic per file: `lif` (the spiking
forward with all time steps of a layer at once, equal to snntorch's `Leaky`) and `seed_conf` (the seed's
own conf.json files, flat and nested, mapped to the trainer's keys).
"""
