"""Hydra configuration of tttlab-torch-ttt (shipped in the wheel; composed by train.py and evaluate.py)."""
