"""The shipped configs, installed as the package `emi.configs` (pyproject.toml maps this folder there): run configs
(stage1/, stage2/), DeepSpeed defaults (deepspeed/) and accelerate topologies (accelerate/)."""
