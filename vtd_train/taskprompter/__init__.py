"""TaskPrompter for Cityscapes-3D: Swin with spatial-channel task prompts (:mod:`.swin`), task
features (:mod:`.task_features`), heads (:mod:`.heads`), FCOS3D targets / losses / decoding
(:mod:`.det3d`), the model (:mod:`.model`), variants (:mod:`.config`) and batches from
Cityscapes-3D shards (:mod:`.batch`)."""
