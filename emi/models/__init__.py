"""Models: Stage I encoders and contrastive model (encoders.py), Stage II quality-aware fusion model (fusion.py).

Import the submodules directly; fusion.py does not need transformers, so this package does not import it eagerly.
"""
