"""The Hydra configs, shipped inside the package (Hydra reads them as the module cai.conf)."""
