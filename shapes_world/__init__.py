"""The shapes world (issue #10): a seeded generator of flat-shape scenes with captions, questions and
edits (``world``), and a programmatic detector to score images against scenes (``detector``)."""

from .detector import Detection, detect, detector_ceiling, scene_matches
from .world import (
    QA,
    EditPair,
    Example,
    Scene,
    Shape,
    caption,
    dataset,
    edits,
    parse_caption,
    questions,
    render,
    sample_scene,
)

__all__ = [
    "QA",
    "Detection",
    "EditPair",
    "Example",
    "Scene",
    "Shape",
    "caption",
    "dataset",
    "detect",
    "detector_ceiling",
    "edits",
    "parse_caption",
    "questions",
    "render",
    "sample_scene",
    "scene_matches",
]
