"""Shards into training batches: decoding (:mod:`.decode`, :mod:`.jpeg`), the per-rank sampler
(:mod:`.sampler`), the loader (:mod:`.loader`), pseudo-labels joined to the frames
(:mod:`.pseudo`), augmentation and batching (:mod:`.transforms`, :mod:`.structures`) and the
shared-memory transfer of batches (:mod:`.transfer`, :mod:`.shm_pool`)."""
