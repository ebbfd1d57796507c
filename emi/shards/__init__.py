"""WebDataset shards from clips and a labels CSV (`emi shards build`, `emi shards merge`, `emi shards stats`).

labels.py reads the CSV, plan.py resolves clips (in a folder or under a URL prefix) and orders them, sample.py
turns one clip into tar members (in workers; asr.py and face.py help it), files.py writes shard tars and reads them
back, build.py runs the whole build and resume (or one task's slice of a job-array build), merge.py joins the tasks'
partial manifests into the one manifest (emi.formats.manifest), stats.py summarises a finished folder.
"""
