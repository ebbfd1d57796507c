"""Every file emi writes and reads again, each with one typed reader and writer: the shard manifest and the feature
sidecar (manifest.py), a training checkpoint's records and the run's id (checkpoint.py), the Stage II checkpoint's
config.json (fusion.py) and an ensemble's member list (ensemble.py). Run configs are emi.config's.

Each reader names the file and the reason in the UsageError of a file it cannot use; files written by earlier
versions load, or fail naming the format version they carry.
"""
