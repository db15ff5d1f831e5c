"""MeViS reader: the ReVOS mask-dictionary format, one folder per split, no type_id, no foreground file.

Layout under the root::

    <split>/JPEGImages/<video>/<frame>.jpg
    <split>/meta_expressions.json      {"videos": {video: {"vid_id", "frames", "expressions":
                                         {exp_id: {"exp", "obj_id": [int], "anno_id": [int]}}}}}
    <split>/mask_dict.json             {str(anno_id): [COCO RLE or null, one per frame]}  (train, valid_u)

Frame sizes are not in the expression file; they come from each video's first frame. The foreground of a
video is the union of all objects its expressions refer to.
"""

from __future__ import annotations

from veason_ray.datasets.revos import ReVOSDataset
from veason_ray.object_store import join_uri


class MeViSDataset(ReVOSDataset):
    """MeViS: ``split`` is a folder under the root ("train", "valid_u", "valid")."""

    kind = "mevis"
    has_type_id = False

    @property
    def meta_uri(self) -> str:
        return join_uri(self.root, self.split, "meta_expressions.json")

    @property
    def mask_dict_uri(self) -> str:
        return join_uri(self.root, self.split, "mask_dict.json")

    @property
    def foreground_uri(self) -> str | None:
        return None

    @property
    def image_root(self) -> str:
        return join_uri(self.root, self.split, "JPEGImages")
