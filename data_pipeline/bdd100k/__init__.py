"""BDD100K: its label format (:mod:`.format`), the conversion of a BDD100K root to shards
(:mod:`.convert`) and a synthetic generator of that layout (:mod:`.synth`)."""
