"""The shards every benchmark converts to: the sample format (:mod:`.format`), the manifest
(:mod:`.manifest`), the tar reader (:mod:`.tar_reader`) and the checks of ``vtd data inspect``
(:mod:`.inspect`)."""
