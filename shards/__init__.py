"""The shard contract: the only thing the generation and training stages share.

``schema`` (the sample layout, versioned), ``writer`` (atomic, resumable, multi-process writes),
``reader`` (the validated manifest as a ``ShardDirectory``, samples of verified shards), ``verify`` (integrity
checks), ``preview`` (a PNG of anchors and positives) and ``cli`` (``clsp shards ...``).
"""
