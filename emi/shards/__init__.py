"""WebDataset shards from clips and a labels CSV (`emi shards build`, `emi shards stats`).

labels.py reads the CSV, plan.py resolves clips and orders them, sample.py turns one clip into tar members
(in workers; asr.py and face.py help it), manifest.py writes and reads shards and the manifest, build.py runs
the whole build and resume, stats.py summarises a finished folder.
"""
