"""Cityscapes-3D evaluation of TaskPrompter runs: 3D boxes in the official JSON format
(:mod:`.box_json`), the mean detection score from ``cityscapesscripts``' own evaluation
(:mod:`.mds`)."""
