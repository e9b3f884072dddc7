"""The data pipeline, by step: a benchmark's own format and its conversion to shards
(:mod:`.bdd100k`, :mod:`.cityscapes3d`), the WebDataset shards and their manifest
(:mod:`.shards`), and loading them into training batches (:mod:`.loading`); :mod:`.errors`,
:mod:`.fsio` and :mod:`.png` serve every step."""
