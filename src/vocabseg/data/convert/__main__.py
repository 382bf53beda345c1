"""``python -m vocabseg.data.convert {coco-object,coco-stuff,context,context459,ade847} ...``"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ...errors import VocabsegError
from .ade_full import convert_ade847
from .coco import convert_coco
from .coco_instances import convert_coco_instances
from .context import convert_context
from .context459 import convert_context459


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vocabseg.data.convert", description="Prepare benchmark layouts for `vocabseg eval`."
    )
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, what in (("coco-object", "*_instanceTrainIds.png (81 classes)"), ("coco-stuff", "*_labelTrainIds.png")):
        p = sub.add_parser(name, help=f"COCO-Stuff164k stuffthingmaps -> {what}")
        p.add_argument("coco_root", help="folder with annotations/<split>/<id>.png (and images/<split>/)")
        p.add_argument("--splits", nargs="+", default=["val2017"], help="default: val2017")
        p.add_argument("--out", default=None, help="output root (default: coco_root)")
        p.add_argument("--workers", type=int, default=1, help="parallel processes")
        target = name.replace("-", "_")
        p.set_defaults(run=lambda a, t=target: convert_coco(a.coco_root, t, tuple(a.splits), a.out, a.workers))
    p = sub.add_parser("coco-object-from-instances", help="COCO instances_<split>.json -> *_instanceTrainIds.png")
    p.add_argument("instances_json", help="e.g. annotations/instances_val2017.json")
    p.add_argument("out_root", help="output root (writes annotations/<split>/; put images in images/<split>/)")
    p.add_argument("--split", default="val2017", help="default: val2017")
    p.set_defaults(run=lambda a: convert_coco_instances(a.instances_json, a.out_root, a.split))
    p = sub.add_parser("context", help="PASCAL-Context trainval_merged.json -> SegmentationClassContext")
    p.add_argument("json", help="trainval_merged.json")
    p.add_argument("voc2010", help="VOCdevkit/VOC2010 (output goes there)")
    p.add_argument("--phases", nargs="+", default=["val"], help="default: val")
    p.set_defaults(run=lambda a: convert_context(a.json, a.voc2010, tuple(a.phases)))
    p = sub.add_parser("context459", help="PASCAL-Context trainval/*.mat -> annotations_detectron2/pc459_val/*.tif")
    p.add_argument("voc2010", help="VOCdevkit/VOC2010 with trainval/<id>.mat (output goes there)")
    p.add_argument(
        "--split-file", default=None, help="val ids (default: pascalcontext_val.txt or ImageSets/SegmentationContext)"
    )
    p.set_defaults(run=lambda a: convert_context459(a.voc2010, a.split_file))
    p = sub.add_parser("ade847", help="ADE20K_2021_17_01 *_seg.png -> images_/annotations_detectron2 (A-847)")
    p.add_argument("ade_root", help="ADE20K_2021_17_01 with images/ADE/<split>/ (output goes there)")
    p.add_argument("--splits", nargs="+", default=["validation"], help="default: validation")
    p.set_defaults(run=lambda a: convert_ade847(a.ade_root, tuple(a.splits)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n = args.run(args)
    except (VocabsegError, ValueError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} masks written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
