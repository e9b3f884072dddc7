"""Deterministic BDD100K-format mini dataset (``vtd data synth``).

:func:`generate` writes a small but *real-format* BDD100K root: JPEG frames and Scalabel JSON /
PNG labels at exactly the paths of the extracted dataset (:class:`bdd100k.Layout`), so that the
converter, loader, model and metrics run on it unchanged. The scenes are drawn so that a tiny
CNN can learn every task in a few CPU minutes:

* a straight road in perspective (vanishing point near the image centre) split into lanes; the
  ego lane is ``direct`` drivable area, lanes of the ego's direction are ``alternative``,
  oncoming lanes (beyond a double/single yellow centre line) and everything else background;
* lane markings painted with one colour per category (white, yellow, light-grey curb) and
  labelled as open polylines of constant width in the lane mask;
* sky at the top; the *scene* tag fixes the background structure (city street: tall facades
  with windows; residential: houses, lawns and trees; highway: terrain, guard rails, tree
  lines; tunnel: walls and ceiling lamps; parking lot: stall lines, parked cars; gas stations:
  a canopy with pumps; undefined: bare terrain); the *weather* tag changes the global tint,
  contrast, fog, rain streaks or snow, and the *time of day* the brightness (night keeps only
  lamps, tail lights and lit windows bright). The det images (the tagging set) of a split take
  each tag's values in proportion to its frequency table, shuffled (:func:`scene._tag_plan`),
  so train and val share one distribution however few images they hold;
* objects are simple shapes with one look per class: car = blue box with a dark cabin and
  red tail lights, truck = tall orange box, bus = yellow box with a dark rear window, train =
  silver side-view carriage, pedestrian = stick figure (red right limbs, orange left limbs,
  dark-red torso, skin head) whose joints are the pose keypoints, rider = magenta seated
  figure on a teal bicycle or purple motorcycle, traffic light = black box with one lit lamp on
  a grey pole, traffic sign = yellow diamond / red disc / blue plate on a pole.

Every shape is drawn at once into the image, the semantic map and the instance map
(:class:`_Canvas`), so masks are exactly the drawn pixels; boxes are the extent of an object's
visible pixels in Scalabel's convention (``x2``/``y2`` inclusive, like
``scalabel.label.transforms.mask_to_box2d``). Objects are painted far to near; an object left
with too few visible pixels is removed and the frame redrawn without it, so no drawn pixel is
unlabelled.

Videos are filmed from a driving camera (:class:`_Ego`): it moves forward along its lane at a
per-scene speed (about 0.2-0.6 m per frame in parking lots up to 1.8-2.4 on highways; frames
stand for BDD100K's 5 fps) with a slow heading sway (yaw) that shifts the vanishing point by a
few pixels per frame (amplitude 5-10 px at tiny) and drifts the camera sideways. Actors and scenery have fixed world
positions; each frame is drawn from the camera's pose, background included (the straight road
and its solid lines stay put, while lane dashes, crosswalks, facades, houses, tree lines and
lamps come closer), so consecutive frames differ by a consistent motion field. Static things
(parked cars, bins, poles, trees) come closer and move outwards; vehicles of the ego's
direction drive at about its speed (relative speed up to +-1.2 m per frame, some change lane),
oncoming ones pass at about twice it; people walk, riders cross, and one actor often heads
out sideways. Objects keep their track id; near ones leave the frame. At tiny's resolution
objects move several pixels per frame: a zero flow scores about 48 on the flow proxy
(``vtd_train.evaluation.flow``) of seed 0's MOTS videos. Still images (det, seg) are drawn
from a camera at rest and are unaffected by the video motion.

Conventions of the written files (relative to the output root, ``{s}`` = train | val):

=================================================  ==============================================
``images/100k/{s}/<name>.jpg``                      det set frames (det, tag, pose, drivable, lane)
``labels/det_20/det_{s}.json``                      Scalabel frames: name, attributes, labels
``labels/pose_21/pose_{s}.json``                    about half of the det frames: pedestrian graphs
``labels/drivable/masks/{s}/<stem>.png``            L: 0 direct, 1 alternative, 2 background
``labels/lane/masks/{s}/<stem>.png``                L: bdd100k.encode_lane bytes, 255 background
``images/10k/{s}/<name>.jpg``                       seg set frames
``labels/sem_seg/masks/{s}/<stem>.png``             L: train ids 0..18, 255 ignore
``labels/ins_seg/bitmasks/{s}/<stem>.png``          RGBA: bdd100k.encode_bitmask
``images/track/{s}/<video>/<video>-<i:07d>.jpg``    MOT videos, frameIndex ``i`` from 0
``labels/box_track_20/{s}/<video>.json``            Scalabel frames with videoName, frameIndex
``images/seg_track_20/{s}/<video>/<frame>.jpg``     MOTS videos (other videos than MOT)
``labels/seg_track_20/bitmasks/{s}/<video>/<frame>.png``  RGBA, instance id = track id
=================================================  ==============================================

Modules, in data-flow order: :mod:`.scene` (size table, attributes, the camera geometry and its
motion), :mod:`.populate` (actors and their motion), :mod:`.canvas` (the layered drawing
surface), :mod:`.background` and :mod:`.actors` (what is drawn), :mod:`.render` (one frame and
its labels), :mod:`.samples` (one image or video of a set), :mod:`.writer` (:func:`generate`).

Determinism: every image and video draws from its own ``numpy`` generator seeded with
``(seed, stream, split, index)`` and names come from BLAKE2 of the same tuple, so one seed
gives byte-identical files (PIL's JPEG and PNG encoders are deterministic) and the order of
generation does not matter.
"""

from __future__ import annotations

from .samples import _still, _video
from .scene import SIZES, SynthSize
from .writer import generate

__all__ = ["SIZES", "SynthSize", "generate", "_still", "_video"]  # the samples: for tests and tools

