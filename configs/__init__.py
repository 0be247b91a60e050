"""Config files (ml_collections get_config(arg)): the ablation surface; common.py holds what they share."""
