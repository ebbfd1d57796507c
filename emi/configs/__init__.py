"""The shipped configs: run configs (stage1/, stage2/, sweeps/), DeepSpeed defaults (deepspeed/) and accelerate
topologies (accelerate/). `configs/` at the top of the repository is a link to this folder: one copy, which a
checkout and an installed wheel both read. `emi config list` lists them; `--config stage1/tiny.yaml` finds one by name
from any folder (emi.config.resolve_config_path)."""
