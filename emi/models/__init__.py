"""Models: Stage I's encoders and contrastive model (encoders/), Stage II's fusion model (fusion.py) and its
checkpoint folder (fusion_checkpoint.py), the losses (losses.py), the encoders' FLOPs (flops.py), and the models'
own names and option checks, without torch (options.py).

Import the submodules directly; fusion.py does not need transformers, so this package does not import it eagerly.
"""
