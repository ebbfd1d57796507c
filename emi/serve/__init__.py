"""Using trained models: the Stage II features from the frozen Stage I encoders (features.py), and a Stage II
checkpoint or ensemble (ensemble.py) scored on shards (scoring.py, evaluate.py, robustness.py) or predicting raw
videos and shards into the challenge's CSV (predict.py). Never the training loop: these run on one process or on
several (accelerate launch -m emi.cli ...), sharing the clips, with emi.devices."""
