"""Data loaders over baled trees: PyTorch datasets (torch.py), a DALI pipeline (dali.py) and a
Ray Data datasource (ray.py); each imports its framework, this package imports none."""
