"""The shard contract: the only thing the generation and training stages share.

``schema`` (the sample layout, versioned), ``writer`` (atomic, resumable, multi-process writes),
``reader`` (manifest, decoded samples, the WebDataset training pipeline), ``verify`` (integrity
checks), ``preview`` (a PNG of anchors and positives) and ``cli`` (``clsp shards ...``).
"""
